"""Language-model evaluation: the one home of the evaluation math.

    python -m train.eval --run_dir runs/NAME [--set eval.length_multiples=2,4 ...]

evaluates a run's latest checkpoint (its config comes from the checkpoint; `--set` overrides it,
e.g. the mesh for another machine or the eval section); `python -m train` calls `evaluate` on
the final state when `eval.enabled`. On the held-out split (`eval.split`) of a next-token task:

- loss (nats per token, the plain cross-entropy: optim.z_loss is a training penalty and is left
  out), perplexity = exp(loss), accuracy, and bits per byte = summed nats / (ln 2 * the UTF-8
  bytes of the counted targets, `codec.token_bytes[targets] * mask`), which compares byte-level
  and subword models;
- the same at every `eval.length_multiples` x data.seq_len (length extrapolation), each batch
  holding as many tokens as at the training length (fewer rows), so memory stays that of a
  training-length forward pass;
- loss by position: exact per-position sums from the jitted step, the position being the
  token's place in its own document (packed rows reset every mixer at a document start, so that
  is the context the model had), then log-spaced buckets: loss_by_position.{csv,md,png};
- single-needle retrieval: held-out text as the haystack, "The secret number is NNNN." put at
  each depth, the question "The secret number is" at the end; one teacher-forced forward pass
  scores the answer: exact match (the greedy continuation is the answer's tokens and then no
  further digit) and the answer tokens' mean log-likelihood, per (length, depth): needle.md.

Everything runs jitted on the trainer's mesh with batches split as training splits them
(`Trainer.token_outputs` / `Trainer.jit_eval`); results are printed and written to the run
directory (eval.json and the tables), and a training run merges them into final_metrics.json.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs.base import CheckpointConfig, ConfigError, TrainConfig
from memzoo.attention import segment_positions

LN2 = math.log(2.0)
BATCH_KEYS = ("inputs", "targets", "mask", "segment_ids")
NEEDLE = "\nThe secret number is {number}.\n"
QUESTION = "\nThe secret number is"
ANSWER = " {number}"
END = "."


class EvalError(RuntimeError):
    """A run directory that cannot be evaluated (missing, no checkpoint, unreadable config)."""


# -- reductions (traced inside the jitted steps) ---------------------------------------------------

def position_sums(loss, prediction, batch: dict, token_bytes) -> dict:
    """Per-position sums over the batch of one evaluation batch's per-token outputs.

    loss/prediction [B, T] (Trainer.token_outputs); position = the input token's place in its
    document (segment_ids) or in the row. token_bytes [V]: UTF-8 bytes per id (zeros for a task
    that is not text). Returns loss/correct/count [T] and the batch's target bytes.
    """
    targets = batch["targets"]
    mask = batch["mask"].astype(jnp.float32) if "mask" in batch else \
        jnp.ones(targets.shape, jnp.float32)
    t = targets.shape[1]
    if "segment_ids" in batch:
        positions = segment_positions(batch["segment_ids"])
    else:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), targets.shape)

    def by_position(values):
        return jnp.zeros((t,), jnp.float32).at[positions].add(values * mask)

    return {"loss": by_position(loss),
            "correct": by_position((prediction == targets).astype(jnp.float32)),
            "count": by_position(jnp.ones_like(loss)),
            "bytes": jnp.sum(token_bytes[targets].astype(jnp.float32) * mask)}


def needle_sums(loss, prediction, batch: dict) -> dict:
    """Per-row answer scores of needle prompts: batch["mask"] marks the answer's targets,
    batch["after"] the position whose prediction is the token after the answer."""
    answer = batch["mask"].astype(jnp.float32)
    hit = (prediction == batch["targets"]).astype(jnp.float32)
    return {"logprob": -jnp.sum(loss * answer, axis=1), "tokens": jnp.sum(answer, axis=1),
            "hits": jnp.sum(hit * answer, axis=1),
            "next": jnp.sum(prediction * batch["after"].astype(prediction.dtype), axis=1)}


def position_step(trainer, batch: dict):
    """`position_sums` of the trainer's per-token outputs, jitted on its mesh for this batch
    structure: fn(state, batch, token_bytes)."""
    return trainer.jit_eval(
        lambda s, b, tb: position_sums(*trainer.token_outputs(s, b), b, tb), batch, 1)


def needle_step(trainer, batch: dict):
    """`needle_sums` of the trainer's per-token outputs, jitted likewise: fn(state, batch)."""
    return trainer.jit_eval(lambda s, b: needle_sums(*trainer.token_outputs(s, b), b), batch)


# -- host-side math --------------------------------------------------------------------------------

def summarize(sums: dict) -> dict:
    """loss, perplexity, bits per byte, accuracy and token count from accumulated sums (float64
    numpy: loss/correct/count per position and total bytes)."""
    count = float(np.sum(sums["count"]))
    nats = float(np.sum(sums["loss"]))
    if count == 0:
        return {"tokens": 0, "loss": None, "perplexity": None, "bits_per_byte": None,
                "accuracy": None}
    loss = nats / count
    nbytes = float(sums["bytes"])
    return {"tokens": int(round(count)), "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": nats / (LN2 * nbytes) if nbytes > 0 else None,
            "accuracy": float(np.sum(sums["correct"])) / count}


def bucket_edges(length: int, buckets: int) -> np.ndarray:
    """Log-spaced position bucket edges [0, ..., length] (fewer buckets where positions run out:
    every bucket holds at least one position)."""
    inner = np.round(np.geomspace(1, length, max(buckets, 1))).astype(np.int64)
    return np.unique(np.concatenate([[0], inner, [length]]))


def bucket_means(loss: np.ndarray, count: np.ndarray, edges: np.ndarray) -> list:
    """Mean loss per bucket [edges[i], edges[i+1]) of per-position sums; None where a bucket is
    past the sums' length or counted nothing."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = float(np.sum(count[lo:hi])) if lo < len(count) else 0.0
        out.append(float(np.sum(loss[lo:hi])) / n if n > 0 else None)
    return out


def batch_rows(config: TrainConfig, mesh, length: int) -> int:
    """Rows of an evaluation batch at `length`: the training batch's tokens, in whole rows per
    batch shard and per process (at least one each)."""
    unit = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    rows = config.data.batch_size * config.data.seq_len // length
    return max(unit, rows // unit * unit)


# -- data -------------------------------------------------------------------------------------

def _loader(config: TrainConfig, length: int, rows: int):
    from train import input as input_lib
    d = config.data
    return input_lib.build(
        d.task, loader=d.loader, split=config.eval.split, batch_size=rows // jax.process_count(),
        seq_len=length, seed=config.seed, data_dir=d.data_dir, shard_index=jax.process_index(),
        shard_count=jax.process_count(), **d.task_options)


def _local(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}


def haystack_ids(config: TrainConfig, codec, tokens: int) -> np.ndarray:
    """At least `tokens` ids of held-out text (when the split has them): this process's rows of
    the split at the training length, documents joined by blank lines, decoded and encoded again
    so the haystack is text the codec would write."""
    # one row per batch: a split smaller than a training batch still gives its text
    it, _ = _loader(config, config.data.seq_len, jax.process_count())
    texts, have = [], 0
    special = np.asarray(codec.token_bytes) == 0
    for batch in it:
        ids = np.asarray(batch["inputs"]).reshape(-1)
        # a document ends where a special token (BOS, EOS, PAD) interrupts the text
        cuts = np.flatnonzero(special[np.clip(ids, 0, len(special) - 1)] | (ids >= len(special)))
        for piece in np.split(ids, cuts):
            piece = piece[(piece < len(special))]
            piece = piece[~special[piece]]
            if piece.size:
                texts.append(codec.decode(piece))
                have += piece.size
        if have >= tokens:
            break
    return codec.encode("\n\n".join(texts))


def needle_rows(codec, hay: np.ndarray, length: int, depths: Sequence[float], trials: int,
                indices: Sequence[int], seed: int) -> tuple[dict, list]:
    """Needle prompts of exactly `length` input tokens for the global row `indices` (row i is
    depth i // trials, trial i % trials; indices past depths x trials are padding rows that
    count nothing). Returns the numpy batch and, per row, its (depth, trial, number) or None.

    A prompt is [BOS] haystack[:c] needle haystack[c:] question answer end, cut so its inputs
    are `length` tokens; c is depth x the haystack, moved to a line start when one is near.
    """
    fixed = len(codec.encode(NEEDLE.format(number=1000))) + len(codec.encode(QUESTION)) + \
        len(codec.encode(ANSWER.format(number=1000))) + len(codec.encode(END))
    if length < fixed + 1:
        raise ValueError(f"needle length {length} is shorter than the needle, question and "
                         f"answer ({fixed + 1} tokens)")
    if hay.size == 0:
        raise ValueError("needle retrieval: the held-out split has no text for a haystack")
    starts = _line_starts(codec, hay)
    batch = {k: np.zeros((len(indices), length), np.float32 if k in ("mask", "after")
                         else np.int32) for k in ("inputs", "targets", "mask", "after",
                                                 "segment_ids")}
    meta = []
    for r, index in enumerate(indices):
        real = index < len(depths) * trials
        depth_i, trial = divmod(index if real else 0, trials)
        depth = float(depths[depth_i])
        number = int(np.random.default_rng([seed, length, index]).integers(1000, 10000))
        needle = codec.encode(NEEDLE.format(number=number))
        question = codec.encode(QUESTION)
        answer = codec.encode(ANSWER.format(number=number))
        end = codec.encode(END)
        n_hay = length - len(needle) - len(question) - len(answer) - len(end)
        # each (depth, trial) reads its own stretch of the haystack; a short split repeats
        offset = (index * 7919 * max(1, n_hay // 8)) % hay.size
        reps = -(-(offset + n_hay) // hay.size)
        piece = np.tile(hay, reps)[offset:offset + n_hay]
        cut = _cut(depth, n_hay, starts, offset, hay.size)
        seq = np.concatenate([[codec.bos], piece[:cut], needle, piece[cut:], question, answer,
                              end]).astype(np.int32)
        assert seq.size == length + 1, (seq.size, length)
        batch["inputs"][r], batch["targets"][r] = seq[:-1], seq[1:]
        batch["segment_ids"][r] = 1
        first = length - len(end) - len(answer)
        if real:
            batch["mask"][r, first:first + len(answer)] = 1.0
            batch["after"][r, first + len(answer)] = 1.0
        meta.append({"depth": depth, "trial": trial, "number": number,
                     "answer": answer} if real else None)
    return batch, meta


def _line_starts(codec, hay: np.ndarray) -> np.ndarray:
    """Haystack indices just after a token whose text ends a line."""
    ends_line = {int(i) for i in np.unique(hay) if codec.decode(np.array([i])).endswith("\n")}
    return np.flatnonzero(np.isin(hay, list(ends_line))) + 1 if ends_line else np.zeros(0, int)


def _cut(depth: float, n_hay: int, starts: np.ndarray, offset: int, size: int) -> int:
    cut = int(round(depth * n_hay))
    if 0 < cut < n_hay and starts.size:
        # line starts inside this row's stretch (offset may wrap around the haystack)
        local = np.concatenate([starts - offset, starts - offset + size])
        local = local[(local > 0) & (local < n_hay)]
        if local.size:
            near = int(local[np.argmin(np.abs(local - cut))])
            if abs(near - cut) <= max(16, n_hay // 20):
                cut = near
    return cut


def needle_score(sums: dict, meta: list, codec) -> list:
    """Per real row: (exact match, mean answer log-likelihood). Exact: every answer token was
    the argmax and the argmax after the answer does not go on with a digit."""
    scores = []
    for r, m in enumerate(meta):
        if m is None:
            continue
        tokens = float(sums["tokens"][r])
        next_text = codec.decode(np.array([int(sums["next"][r])]))
        stops = not next_text.lstrip()[:1].isdigit()
        exact = bool(sums["hits"][r] == tokens and stops)
        scores.append((m, exact, float(sums["logprob"][r]) / tokens))
    return scores


# -- the evaluation ------------------------------------------------------------------------------

def _lengths(config: TrainConfig, notes: list) -> list[int]:
    d, e = config.data, config.eval
    lengths = [d.seq_len] + [m * d.seq_len for m in e.length_multiples]
    limit = config.model.max_positions
    if limit:
        skipped = [n for n in lengths if n > limit]
        if skipped:
            notes.append(f"lengths {skipped} skipped: beyond model.max_positions={limit} "
                         "(learned positions)")
        lengths = [n for n in lengths if n <= limit]
    return lengths


def _token_bytes(codec, vocab_size: int) -> np.ndarray:
    table = np.zeros(vocab_size, np.int32)
    if codec is not None:
        if codec.vocab_size > vocab_size:
            raise ValueError(f"the codec has {codec.vocab_size} tokens, the model {vocab_size}")
        table[:codec.vocab_size] = codec.token_bytes
    return table


def evaluate(config: TrainConfig, trainer, state, *, run_dir=None, out=None,
             step: int | None = None) -> dict:
    """The whole evaluation of `state` (every process calls it; process 0 prints and writes
    into `run_dir` when given). Returns the report (what eval.json holds)."""
    from train.data.codec import codec_for
    out = out or sys.stdout
    is_main = jax.process_index() == 0
    e, d = config.eval, config.data

    def say(text: str) -> None:
        if is_main:
            print(text, file=out, flush=True)

    if trainer.num_classes:
        raise ConfigError(f"task {d.task!r} classifies whole sequences; the language-model "
                          "evaluation needs a next-token task")
    notes: list[str] = []
    lengths = _lengths(config, notes)
    batches = e.batches or d.eval_batches
    _, info = _loader(config, d.seq_len, batch_rows(config, trainer.mesh, d.seq_len))
    codec = None
    if e.text != "off":
        try:
            codec = codec_for(info)
        except ValueError as err:
            if e.text == "on":
                raise ConfigError(f"config key 'eval.text': on, but {err}") from None
            notes.append(f"bits per byte and needle retrieval skipped: {err}")
    token_bytes = jnp.asarray(_token_bytes(codec, trainer.vocab_size))

    # held-out loss at every length, per position
    per_length, sums_at = [], {}
    step_fn = None
    for length in lengths:
        rows = batch_rows(config, trainer.mesh, length)
        it, _ = _loader(config, length, rows)
        acc = {k: np.zeros(length) for k in ("loss", "correct", "count")}
        acc["bytes"], used = 0.0, 0
        for _ in range(batches):
            try:
                local = _local(next(it))
            except StopIteration:
                break
            batch = trainer.shard_batch(local)
            if step_fn is None:
                step_fn = position_step(trainer, batch)
            with jax.set_mesh(trainer.mesh):
                r = jax.device_get(step_fn(state, batch, token_bytes))
            for k in acc:
                acc[k] = acc[k] + np.asarray(r[k], np.float64)
            used += 1
        if used < batches:
            notes.append(f"length {length}: the {e.split} split gave {used} of {batches} "
                         "batches")
        sums_at[length] = acc
        per_length.append({"seq_len": length, "multiple": length / d.seq_len, "rows": rows,
                           "batches": used, **summarize(acc)})
    report: dict[str, Any] = {"step": step, "task": d.task, "split": e.split,
                              "trained_seq_len": d.seq_len, "lengths": per_length}
    if codec is None:
        for row in per_length:
            row.pop("bits_per_byte")

    edges = bucket_edges(max(lengths), e.position_buckets)
    report["loss_by_position"] = {
        "position": "the input token's place in its document (0: its first token)",
        "edges": edges.tolist(),
        "loss": {str(n): bucket_means(s["loss"], s["count"], edges) for n, s in sums_at.items()}}

    if codec is not None and e.needle_trials:
        report["needle"] = _needles(config, trainer, state, codec, lengths, notes)
    report["notes"] = notes
    text = format_report(report)
    say(text)
    if run_dir is not None and is_main:
        write_report(report, text, run_dir, plot=e.plot, say=say)
    return report


def _needles(config, trainer, state, codec, lengths, notes) -> dict:
    e = config.eval
    explicit = bool(e.needle_lengths)
    wanted = list(e.needle_lengths) or lengths
    if config.model.max_positions and explicit:
        over = [n for n in wanted if n > config.model.max_positions]
        if over:
            raise ConfigError(f"config key 'eval.needle_lengths': {over} beyond "
                              f"model.max_positions={config.model.max_positions}")
    hay = haystack_ids(config, codec, 2 * max(wanted))
    sizes = np.array([hay.size])
    if jax.process_count() > 1:   # every process runs the needle steps, or none does
        from jax.experimental import multihost_utils
        sizes = np.asarray(multihost_utils.process_allgather(sizes))
    if sizes.min() == 0:
        notes.append(f"needle retrieval skipped: the {e.split} split has no text (on some "
                     "process)")
        return {"lengths": [], "depths": list(e.needle_depths), "trials": e.needle_trials}
    if hay.size < max(wanted):
        notes.append(f"needle haystacks repeat: the {e.split} split gave {hay.size} tokens of "
                     "text on this process")
    total = len(e.needle_depths) * e.needle_trials
    exact = np.full((len(wanted), len(e.needle_depths)), np.nan)
    logprob = np.full_like(exact, np.nan)
    done = []
    fn = None
    for li, length in enumerate(wanted):
        rows = batch_rows(config, trainer.mesh, length)
        per_process = rows // jax.process_count()
        scores = []
        try:
            needle_rows(codec, hay, length, e.needle_depths, 1, [0], config.seed)
        except ValueError as err:
            if explicit:
                raise ConfigError(f"config key 'eval.needle_lengths': {err}") from None
            notes.append(f"needle retrieval at length {length} skipped: {err}")
            continue
        for first in range(0, total, rows):
            mine = first + jax.process_index() * per_process
            local, _ = needle_rows(codec, hay, length, e.needle_depths, e.needle_trials,
                                      list(range(mine, mine + per_process)), config.seed)
            batch = trainer.shard_batch(local)
            if fn is None:
                fn = needle_step(trainer, batch)
            with jax.set_mesh(trainer.mesh):
                r = jax.device_get(fn(state, batch))
            # every process holds all rows' sums; the rows' meta is a function of the index
            all_meta = []
            for p in range(jax.process_count()):
                start = first + p * per_process
                all_meta += [{"depth": e.needle_depths[i // e.needle_trials]}
                             if i < total else None for i in range(start, start + per_process)]
            scores += needle_score(r, all_meta, codec)
        for di, depth in enumerate(e.needle_depths):
            hits = [(x, lp) for m, x, lp in scores if m["depth"] == depth]
            exact[li, di] = np.mean([x for x, _ in hits])
            logprob[li, di] = np.mean([lp for _, lp in hits])
        done.append(li)
    if not done:
        return {"lengths": [], "depths": list(e.needle_depths), "trials": e.needle_trials}

    def grid(a):
        return [[float(v) for v in a[i]] for i in done]
    return {"lengths": [wanted[i] for i in done], "depths": list(e.needle_depths),
            "trials": e.needle_trials, "exact_match": grid(exact),
            "answer_logprob": grid(logprob),
            "mean_exact_match": float(np.mean(exact[done])),
            "needle": NEEDLE.strip().format(number="NNNN"), "question": QUESTION.strip()}


# -- output ------------------------------------------------------------------------------------

def _num(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def position_table(report: dict) -> str:
    lp = report["loss_by_position"]
    edges, lengths = lp["edges"], list(lp["loss"])
    rows = [[f"{lo}-{hi - 1}"] + [_num(lp["loss"][n][i]) for n in lengths]
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    return _table(["position"] + [f"loss @ {n}" for n in lengths], rows)


def needle_tables(needle: dict) -> str:
    depths = [f"depth {x:g}" for x in needle["depths"]]
    exact = [[str(n)] + [f"{v:.2f}" for v in row]
             for n, row in zip(needle["lengths"], needle["exact_match"])]
    lp = [[str(n)] + [f"{v:.3f}" for v in row]
          for n, row in zip(needle["lengths"], needle["answer_logprob"])]
    return (f"exact match ({needle['trials']} haystacks per cell)\n\n"
            + _table(["length"] + depths, exact)
            + "\n\nmean answer log-likelihood (nats per token)\n\n"
            + _table(["length"] + depths, lp))


def format_report(report: dict) -> str:
    rows = [[str(r["seq_len"]), f"{r['multiple']:g}x", str(r["tokens"]), _num(r["loss"]),
             _num(r["perplexity"], ".3f"), _num(r.get("bits_per_byte")),
             _num(r["accuracy"], ".3f")] for r in report["lengths"]]
    parts = [f"language-model evaluation (step {report['step']}, task {report['task']}, "
             f"{report['split']} split, trained at {report['trained_seq_len']} tokens)", "",
             _table(["length", "x", "tokens", "loss", "perplexity", "bits/byte", "accuracy"],
                    rows), "",
             "loss by position (position in the document)", "", position_table(report)]
    needle = report.get("needle")
    if needle and needle["lengths"]:
        parts += ["", f"needle retrieval: \"{needle['needle']}\" ... \"{needle['question']}\"",
                  "", needle_tables(needle)]
    if report["notes"]:
        parts += [""] + [f"note: {n}" for n in report["notes"]]
    return "\n".join(parts)


def write_report(report: dict, text: str, run_dir, *, plot: bool = True, say=print) -> None:
    from train.fs import run_path, write_json
    run_dir = run_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "eval.json", report)
    (run_dir / "eval.md").write_text(text + "\n")
    lp = report["loss_by_position"]
    lines = ["position_start,position_end," + ",".join(f"loss@{n}" for n in lp["loss"])]
    for i, (lo, hi) in enumerate(zip(lp["edges"][:-1], lp["edges"][1:])):
        lines.append(f"{lo},{hi}," + ",".join("" if v[i] is None else f"{v[i]:.6f}"
                                              for v in lp["loss"].values()))
    (run_dir / "loss_by_position.csv").write_text("\n".join(lines) + "\n")
    (run_dir / "loss_by_position.md").write_text(position_table(report) + "\n")
    if report.get("needle") and report["needle"]["lengths"]:
        (run_dir / "needle.md").write_text(needle_tables(report["needle"]) + "\n")
    if plot:
        png = plot_positions(report)
        if png is None:
            say("note: loss_by_position.png not written (matplotlib is not installed; it comes "
                "with the [test] extra)")
        else:
            (run_dir / "loss_by_position.png").write_bytes(png)


def plot_positions(report: dict) -> bytes | None:
    """PNG bytes of loss against position (log scale), one line per length; None without
    matplotlib. The figure is made without pyplot, so no global backend is chosen."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    lp = report["loss_by_position"]
    edges = np.asarray(lp["edges"], np.float64)
    # x = tokens of the document seen when predicting (position + 1): log axes cannot show 0
    middle = np.sqrt((edges[:-1] + 1) * edges[1:])
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n, values in lp["loss"].items():
        keep = [i for i, v in enumerate(values) if v is not None]
        ax.plot(middle[keep], [values[i] for i in keep], marker="o", label=f"length {n}")
    ax.axvline(report["trained_seq_len"], color="gray", linestyle=":", label="trained length")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of the document seen (position + 1)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{report['task']}, step {report['step']}")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


# -- command line ---------------------------------------------------------------------------------

def saved_config(run_dir) -> tuple[TrainConfig, int]:
    """(the config the run's latest checkpoint was written with, that step)."""
    import orbax.checkpoint as ocp

    import configs
    from train.checkpoint import Checkpointer
    from train.fs import run_path
    run_dir = run_path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"no run directory {run_dir}")
    ckpt_dir = run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, CheckpointConfig(async_save=False)) \
        if ckpt_dir.is_dir() else None
    steps = ckpt.steps() if ckpt is not None else []
    if not steps:
        raise EvalError(f"{run_dir} holds no checkpoint (nothing in {ckpt_dir}); train with "
                        f"checkpoints on first: python -m train --set run_dir={run_dir} "
                        "--set checkpoint.every=N")
    saved = None
    try:
        meta = ckpt.manager.restore(steps[-1], args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        saved = (meta or {}).get("config")
    except Exception:   # an unreadable meta item: fall back to a config file beside it
        pass
    if saved is None and (run_dir / "config.json").exists():
        saved = json.loads((run_dir / "config.json").read_text())
    if saved is None:
        raise EvalError(f"checkpoint {ckpt_dir / str(steps[-1])} has no readable config (its "
                        "meta item) and the run has no config.json")
    return configs.from_dict(saved), steps[-1]


def run(run_dir, sets: Sequence[str] = (), *, out=None, devices=None) -> dict:
    """Evaluate `run_dir`'s latest checkpoint with its saved config and `sets` overrides."""
    from train import mesh as mesh_lib
    from train.checkpoint import CheckpointError, Checkpointer
    from train.fs import run_path
    from train.trainer import Trainer
    out = out or sys.stdout
    config, _ = saved_config(run_dir)
    config = config.override("run_dir", str(run_dir))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. eval.needle_trials=8")
        config = config.override(key.strip(), value)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    _, info = _loader(config, config.data.seq_len, batch_rows(config, mesh, config.data.seq_len))
    if getattr(info, "loss", "next_token") != "next_token":
        raise ConfigError(f"task {config.data.task!r} classifies whole sequences; the "
                          "language-model evaluation needs a next-token task")
    if config.eval.text == "on":
        from train.data.codec import codec_for
        codec_for(info)   # the clear error before anything is compiled
    trainer = Trainer(config, mesh, vocab_size=info.vocab_size)
    ckpt_dir = run_path(config.resolved_run_dir) / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, CheckpointConfig(async_save=False))
    try:
        restored = ckpt.restore_latest(trainer.abstract_state,
                                       expect={"model": config.to_dict()["model"]})
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{ckpt_dir} holds no checkpoint")
    step, state, _, _ = restored
    return evaluate(config, trainer, state, run_dir=run_path(config.resolved_run_dir), out=out,
                    step=step)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from train.__main__ import _env_int, initialize_distributed
    parser = argparse.ArgumentParser(
        prog="python -m train.eval", description="Evaluate a run's latest checkpoint as a "
        "language model: loss, perplexity, bits per byte, loss by position, longer lengths, "
        "needle retrieval. Writes eval.json and tables into the run directory.")
    parser.add_argument("--run_dir", required=True, help="the run directory (runs/NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the saved config, e.g. eval.length_multiples=2,4"
                             " or mesh.fsdp=1 (repeatable)")
    parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
    parser.add_argument("--distributed", action="store_true")
    args = parser.parse_args(argv)
    from train.checkpoint import CheckpointError
    try:
        initialize_distributed(args)
        run(args.run_dir, args.set)
    except (EvalError, ConfigError, CheckpointError) as err:
        print(f"python -m train.eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
