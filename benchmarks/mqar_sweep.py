"""MQAR accuracy against state size for every matrix-state mixer (zoology's frontier plot).

    python -m benchmarks.mqar_sweep                                  # the mqar16 setting, 1500 steps
    python -m benchmarks.mqar_sweep --mixers deltanet,gla --sizes 8,16 --steps 300 \\
        --seq-len 32 --pairs 8 --vocab 64 --out benchmarks/mqar_sweep.jsonl --plot sweep.png

Each (mixer, size) is one run of the training command's function (`train.loop.run` on
`configs.resolve(preset="mqar_s4d", sets=...)`, exactly what `python -m train --preset mqar_s4d
--set ...` runs; the equivalent command is stored with each result), one at a time in this
process. Each finished run is appended to the JSONL file at once, so an interrupted sweep keeps
what it finished and a rerun with the same settings skips it (a run that raised is stored with
its error and retried). At the end: a markdown table (mixer x size: held-out accuracy) and, when
matplotlib is importable, a plot of held-out accuracy against state size.

**Comparable state sizes.** The size `d` is the per-head key and value width of a 4-head memory
(d_model 64, 2 layers, the mqar16 presets' model), so the matrix state is about 4 d^2 numbers
per layer. Each mixer's options reach that with its own knobs, and `state_per_layer` is counted
from the options it actually ran with (the shape of what the recurrence carries, not d):

  linear_attention, jrt   4 heads x d x (d + 1): the normaliser is a ones column of v (elu+1);
                          jrt reads the first 2 x pairs tokens (the key-value prompt) non-causally
  retnet, gla, deltanet, gated_deltanet, kda, comba, gated_deltaproduct (2 Householder steps),
  rwkv6, rwkv7            4 heads x d x d
  hgrn2                   4 heads x expand_ratio d x value_dim d
  gsa                     4 heads x d/2 slots x (d keys + d values): K~ and V~ per slot
  based, rebased          4 heads x F x (d + 1), F the feature map's width from a small key dim f:
                          Taylor 1 + f + f(f+1)/2 (f = 3, 4, 7 -> F = 10, 15, 36 for d = 8, 16,
                          32), ReBased f(f+1)/2 (f = 4, 5, 8 -> 10, 15, 36); the feature map
                          expands the key dim, so F, not f, is the state's key dim. Based's
                          sliding-window attention is off (window=0), or its KV ring would be
                          an unbounded-by-d second memory
  mamba2                  (expand 2 x 64 / head_dim 16) = 8 heads x state_size N x head_dim 16,
                          N = d^2 / 32 (2, 8, 32), so 128 N = 4 d^2
  mlstm                   4 heads x (d x d matrix C + d normaliser + 1 stabiliser);
                          proj_factor = 4 d / 64 makes the head dim d
  mom                     (4 routed memories + 1 shared) x 4 heads x d x d, top-2 routing: all
                          memories are carried, so MoM holds 5x the state of its per-token read
  ttt_linear              4 heads x (d x d weight + d bias) (the inner model's parameters)

`cache_per_layer` is measured as a check: the floats of the model's decoding cache for one
sequence (`CausalLM.init_cache(1)` shapes, divided by the layers), which adds the short
convolutions' windows and token-shift rows to the matrix.

Attention is not in the sweep: its state (the KV cache) grows with the sequence, so it has no
size d. Chance is 1 / (vocab/2); 1/pairs is the plateau of a model that knows which values are
in context but not which key each belongs to.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import tempfile
import time
from pathlib import Path

HEADS = 4
D_MODEL = 64
NUM_LAYERS = 2
# The MQAR presets' base (configs/mqar.py); every run overrides it through `--set`.
BASE_PRESET = "mqar_s4d"

# Taylor / ReBased key dims whose expanded feature width is closest to d (module docstring).
_TAYLOR_F = {4: 2, 8: 3, 16: 4, 32: 7}
_REBASED_F = {4: 2, 8: 4, 16: 5, 32: 8}


def _taylor_width(f: int) -> int:
    return 1 + f + f * (f + 1) // 2


def _small_key_dim(table: dict, width, d: int) -> int:
    if d in table:
        return table[d]
    return min(range(1, d + 1), key=lambda f: abs(width(f) - d))


def mixer_setup(mixer: str, d: int, *, pairs: int) -> tuple[dict, int, str]:
    """(mixer_options, matrix-state numbers per layer, the formula) for size d."""
    if not isinstance(d, int) or isinstance(d, bool) or d < 2 or d % 2:
        raise ValueError(f"mqar_sweep: size `d` must be an even integer >= 2, got {d!r}")
    h = HEADS
    square = {"num_heads": h, "head_dim": d, "value_dim": d}
    if mixer in ("retnet", "gla", "deltanet", "gated_deltanet", "kda", "comba",
                 "gated_deltaproduct", "rwkv6", "rwkv7"):
        return square, h * d * d, f"{h} x {d} x {d}"
    if mixer == "linear_attention":
        return square, h * d * (d + 1), f"{h} x {d} x ({d}+1)"
    if mixer == "jrt":
        return ({**square, "prefix_len": 2 * pairs}, h * d * (d + 1), f"{h} x {d} x ({d}+1)")
    if mixer == "hgrn2":
        return ({"num_heads": h, "expand_ratio": d, "value_dim": d}, h * d * d,
                f"{h} x {d} x {d}")
    if mixer == "gsa":
        m = d // 2
        return ({**square, "num_slots": m}, h * m * 2 * d, f"{h} x {m} x ({d}+{d})")
    if mixer in ("based", "rebased"):
        if mixer == "based":
            f = _small_key_dim(_TAYLOR_F, _taylor_width, d)
            width = _taylor_width(f)
            extra = {"window": 0}
        else:
            f = _small_key_dim(_REBASED_F, lambda f: f * (f + 1) // 2, d)
            width = f * (f + 1) // 2
            extra = {}
        return ({"num_heads": h, "feature_dim": f, "value_dim": d, **extra},
                h * width * (d + 1), f"{h} x {width} (f={f}) x ({d}+1)")
    if mixer == "mamba2":
        head_dim = 16
        heads = 2 * D_MODEL // head_dim
        if (h * d * d) % (heads * head_dim):
            raise ValueError(f"mqar_sweep: mamba2 needs 4 d^2 divisible by {heads * head_dim}, "
                             f"got d={d}")
        n = h * d * d // (heads * head_dim)
        return ({"state_size": n, "head_dim": head_dim, "expand": 2}, heads * n * head_dim,
                f"{heads} x {n} x {head_dim}")
    if mixer == "mlstm":
        return ({"num_heads": h, "proj_factor": h * d / D_MODEL}, h * (d * d + d + 1),
                f"{h} x ({d}x{d} + {d} + 1)")
    if mixer == "mom":
        memories = 4
        return ({**square, "num_memories": memories, "top_k": 2, "shared_memory": True},
                (memories + 1) * h * d * d, f"{memories + 1} x {h} x {d} x {d}")
    if mixer == "ttt_linear":
        return ({"num_heads": h, "head_dim": d}, h * (d * d + d), f"{h} x ({d}x{d} + {d})")
    raise ValueError(f"mqar_sweep: `mixer` must be one of {MIXERS}, got {mixer!r}")


# Every registered mixer whose state is a matrix per head (memzoo.MIXERS, checked by the test).
MIXERS = ("linear_attention", "retnet", "gla", "deltanet", "gated_deltanet", "mamba2", "hgrn2",
          "gsa", "based", "rebased", "rwkv6", "rwkv7", "mlstm", "kda", "comba",
          "gated_deltaproduct", "mom", "jrt", "ttt_linear")


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def run_sets(mixer: str, d: int, args) -> list[str]:
    options, _, _ = mixer_setup(mixer, d, pairs=args.pairs)
    if args.implementation != "auto":
        options = {**options, "implementation": args.implementation}
    return [f"name=mqar_sweep_{mixer}_d{d}", f"model.mixer={mixer}",
            f"model.d_model={D_MODEL}", f"model.num_layers={NUM_LAYERS}",
            f"model.mixer_options={_json(options)}",
            f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}",
            "data.task_options=" + _json({"vocab_size": args.vocab, "num_kv_pairs": args.pairs,
                                          "power_a": 1.0}),
            f"optim.steps={args.steps}", f"optim.warmup_steps={min(50, max(1, args.steps // 10))}",
            f"seed={args.seed}",
            f"logging.log_every={max(1, args.steps // 4)}", "logging.progress=false",
            "logging.tensorboard=false", "checkpoint.every=0"]


def command_for(sets: list[str]) -> str:
    return f"python -m train --preset {BASE_PRESET} " + " ".join(f"--set '{s}'" for s in sets)


def cache_per_layer(config) -> int:
    """Floats in the model's decoding cache for one sequence, per layer (shapes only)."""
    import jax
    import numpy as np
    from flax import nnx

    from train.trainer import build_model

    vocab = config.data.task_options["vocab_size"]

    def cache():
        return build_model(config, vocab, nnx.Rngs(0)).init_cache(1, config.data.seq_len)

    leaves = jax.tree.leaves(jax.eval_shape(cache))
    total = sum(int(np.prod(x.shape)) for x in leaves if np.issubdtype(x.dtype, np.inexact))
    return total // config.model.num_layers


def setting_key(args) -> dict:
    return {"seq_len": args.seq_len, "pairs": args.pairs, "vocab": args.vocab,
            "batch": args.batch, "steps": args.steps, "seed": args.seed,
            "implementation": args.implementation}


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def run_one(mixer: str, d: int, args, log=print) -> dict:
    import jax

    import configs
    from train.loop import run

    options, state, formula = mixer_setup(mixer, d, pairs=args.pairs)
    sets = run_sets(mixer, d, args)
    record = {"mixer": mixer, "d": d, "setting": setting_key(args), "mixer_options": options,
              "state_per_layer": state, "state_formula": formula, "command": command_for(sets),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "jax": jax.__version__}
    t0 = time.perf_counter()
    try:
        config = configs.resolve(preset=BASE_PRESET, sets=sets)
        record["cache_per_layer"] = cache_per_layer(config)
        with tempfile.TemporaryDirectory() as run_dir:
            out = run(config.replace(run_dir=run_dir), out=io.StringIO())
    except Exception as e:   # one broken mixer must not end the sweep; its error is the result
        record.update(error=f"{type(e).__name__}: {e}"[:2000], seconds=time.perf_counter() - t0)
        log(f"  {mixer} d={d}: FAILED {record['error'][:200]}")
        return record
    history = out["history"]
    train = [h for h in history if h.get("split") == "train"] or history
    record.update(eval_accuracy=out["eval_accuracy"], eval_loss=out["eval_loss"],
                  num_params=out["num_params"], seconds=time.perf_counter() - t0,
                  train_accuracy=train[-1].get("accuracy") if train else None,
                  step_ms=train[-1].get("step_ms") if train else None,
                  curve=[(h["step"], h.get("accuracy")) for h in train])
    log(f"  {mixer} d={d}: state {state:,}/layer, held-out accuracy "
        f"{record['eval_accuracy']:.3f}, {record['seconds']:.0f} s")
    return record


def latest(rows: list[dict], setting: dict | None = None) -> dict:
    """(mixer, d) -> the newest finished record (of one setting when given)."""
    found = {}
    for r in rows:
        if "error" in r or (setting is not None and r.get("setting") != setting):
            continue
        found[(r["mixer"], r["d"])] = r
    return found


def table(rows: list[dict], setting: dict | None = None) -> str:
    found = latest(rows, setting)
    sizes = sorted({d for _, d in found})
    mixers = [m for m in MIXERS if any((m, d) in found for d in sizes)]
    mixers += sorted({m for m, _ in found} - set(mixers))
    head = "| mixer | " + " | ".join(f"d={d}: state/layer | acc." for d in sizes) + " |"
    lines = [head, "|---|" + "---|---|" * len(sizes)]
    for m in mixers:
        cells = []
        for d in sizes:
            r = found.get((m, d))
            cells += ([f"{r['state_per_layer']:,}", f"{r['eval_accuracy']:.3f}"] if r
                      else ["-", "-"])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, setting: dict | None = None, title: str = "") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    found = latest(rows, setting)
    mixers = [m for m in MIXERS if any(k[0] == m for k in found)]
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(mixers):
        rs = sorted((r for k, r in found.items() if k[0] == m), key=lambda r: r["state_per_layer"])
        ax.plot([r["state_per_layer"] for r in rs], [r["eval_accuracy"] for r in rs],
                "os^vD<>ph"[i % 9] + "-", color=cmap(i % 20), label=m, ms=5)
    if setting:
        ax.axhline(1 / setting["pairs"], ls="--", c="gray", lw=1)
        ax.axhline(2 / setting["vocab"], ls=":", c="gray", lw=1)
    ax.set(xscale="log", xlabel="matrix state per layer (numbers)", ylabel="held-out accuracy",
           ylim=(-0.02, 1.02), title=title)
    if mixers:
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.mqar_sweep", description=__doc__.split(
        "\n")[0])
    p.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated mixer names")
    p.add_argument("--sizes", default="8,16", help="per-head key/value widths d, comma-separated")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementation", default="auto",
                   help="the ops' implementation option for every mixer (auto | xla | reference)")
    p.add_argument("--out", default="benchmarks/mqar_sweep.jsonl", help="JSONL of finished runs")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args(argv)
    args.mixers = [m for m in args.mixers.split(",") if m]
    unknown = [m for m in args.mixers if m not in MIXERS]
    if unknown:
        p.error(f"--mixers: unknown {unknown}; the sweep knows {', '.join(MIXERS)}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    for m in args.mixers:
        for d in args.sizes:
            try:
                mixer_setup(m, d, pairs=args.pairs)
            except ValueError as e:
                p.error(f"--sizes: {e}")
    for name in ("steps", "seq_len", "pairs", "vocab", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer")
    return args


def main(argv=None, log=print) -> list[dict]:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setting = setting_key(args)
    done = latest(load(out), setting)
    todo = [(m, d) for d in args.sizes for m in args.mixers if (m, d) not in done]
    log(f"mqar sweep: {len(todo)} runs to do, {len(args.mixers) * len(args.sizes) - len(todo)} "
        f"already in {out}; setting {setting}")
    for m, d in todo:
        record = run_one(m, d, args, log=log)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    rows = load(out)
    log(table(rows, setting))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = (f"MQAR {args.pairs} pairs / {args.seq_len} tokens, {NUM_LAYERS} x d_model "
             f"{D_MODEL}, {args.steps} steps")
    if plot(rows, png, setting, title):
        log(f"plot: {png}")
    return [r for r in rows if r.get("setting") == setting]


if __name__ == "__main__":
    main()
