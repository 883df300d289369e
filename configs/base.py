"""The training configuration: typed, nested, frozen dataclasses, validated when built.

`TrainConfig` holds one section per concern (model, data, optim, mesh, checkpoint, logging).
Presets are python files defining `get_config()` (configs/delayed_recall.py, configs/mqar.py);
`--set section.key=value` overrides are typed from the dataclass annotations, so a bad key or a
bad value fails with a message naming the key before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Mapping

MIXER_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               f"{section}.{name}", "a positive integer", value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    mixer: str = "s4d"               # a name or a repeating pattern ("s4d,s5") from memzoo.MIXERS
    d_model: int = 64
    num_layers: int = 2
    mlp_ratio: int = 2
    dtype: str = "float32"           # compute dtype; parameters and optimizer state stay float32
    mixer_options: dict = dataclasses.field(default_factory=lambda: {"state_size": 32})
    scan_layers: bool = False        # nnx.scan over repeats of the mixer pattern
    remat: str = "none"              # memzoo.models.REMAT_POLICIES: none, full, dots_saveable...
    pooling: str = "mean"            # classification tasks: SequenceClassifier pooling
    mlp: str = "dense"               # "dense" (SwiGLU) | "pkm" (memzoo.memory_layers.ProductKeyMemory)
    # mlp="pkm": ProductKeyMemory options (n_keys, num_heads, topk, key_dim, value_dim, qk_norm,
    # gated, query_norm) plus "layers" (which layers get a memory) and "shared_values";
    # mlp="memory_bank": MemoryBank options (branching, block_width, key_dim, decay, hidden);
    # mlp="hopfield": Hopfield options (num_patterns, pattern_dim, num_heads, beta, update_steps)
    mlp_options: dict = dataclasses.field(default_factory=dict)
    max_positions: int = 0           # > 0: learned absolute position embeddings (CausalLM)
    # Reference-checkpoint options (memzoo.models.CausalLM; None / off: memzoo's defaults)
    mlp_hidden: int | None = None    # MLP hidden width (None: mlp_ratio * d_model; 0: no MLP)
    mlp_activation: str = "silu"     # gated MLP activation: silu (SwiGLU), gelu / gelu_tanh (GeGLU)
    norm_eps: float | None = None    # epsilon of every block norm and the final norm
    residual_fp32: bool = False      # residual stream in float32 (mamba-ssm's residual_in_fp32)
    mlp_bias: bool = True            # biases in the gated MLP (mamba-ssm's / fla's have none)
    embed_scale: float | None = None  # input embeddings times this (Gemma: sqrt(d_model))
    logit_softcap: float | None = None  # logits = c * tanh(logits / c) (CausalLM only)
    # memzoo.memories.rmt.RecurrentMemoryLM around the CausalLM (empty: off): segment_len
    # (required), num_memory, bptt_segments, hierarchical, recall_segments, summary_len
    recurrent_memory: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _positive("model", self, "d_model", "num_layers")
        _check(isinstance(self.max_positions, int) and self.max_positions >= 0,
               "model.max_positions", "an integer >= 0 (0: none)", self.max_positions)
        _check(isinstance(self.mlp_ratio, int) and self.mlp_ratio >= 0, "model.mlp_ratio",
               "an integer >= 0", self.mlp_ratio)
        _check(self.dtype in MIXER_DTYPES, "model.dtype", f"one of {MIXER_DTYPES}", self.dtype)
        _check(isinstance(self.mixer, str) and self.mixer.strip() != "", "model.mixer",
               "a mixer name or a comma-separated pattern", self.mixer)
        import memzoo
        unknown = [m for m in self.mixer.split(",") if m.strip() not in memzoo.MIXERS]
        _check(not unknown, "model.mixer", f"names from memzoo.MIXERS "
               f"({', '.join(sorted(memzoo.MIXERS))}); unknown: {', '.join(unknown)}",
               self.mixer)
        from memzoo.models import POOLINGS, REMAT_POLICIES
        _check(self.remat in REMAT_POLICIES, "model.remat", f"one of {tuple(REMAT_POLICIES)}",
               self.remat)
        _check(self.pooling in POOLINGS, "model.pooling", f"one of {POOLINGS}", self.pooling)
        from memzoo.models import MLP_KINDS
        _check(self.mlp in MLP_KINDS, "model.mlp", f"one of {MLP_KINDS}", self.mlp)
        _check(isinstance(self.mlp_options, dict) and (self.mlp != "dense" or not self.mlp_options),
               "model.mlp_options", "a dict, empty when model.mlp='dense'", self.mlp_options)
        _check(self.mlp_hidden is None or (isinstance(self.mlp_hidden, int)
                                            and not isinstance(self.mlp_hidden, bool)
                                            and self.mlp_hidden >= 0),
               "model.mlp_hidden", "an integer >= 0 or None (mlp_ratio * d_model)",
               self.mlp_hidden)
        from memzoo.layers import ACTIVATIONS
        _check(self.mlp_activation in ACTIVATIONS, "model.mlp_activation",
               f"one of {tuple(ACTIVATIONS)}", self.mlp_activation)
        for key in ("norm_eps", "embed_scale", "logit_softcap"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                     and value > 0), f"model.{key}", "a number > 0 or None", value)
        _check(isinstance(self.residual_fp32, bool), "model.residual_fp32", "a bool",
               self.residual_fp32)
        _check(isinstance(self.mlp_bias, bool), "model.mlp_bias", "a bool", self.mlp_bias)
        rmt_keys = ("segment_len", "num_memory", "bptt_segments", "hierarchical",
                    "recall_segments", "summary_len")
        _check(isinstance(self.recurrent_memory, dict)
               and set(self.recurrent_memory) <= set(rmt_keys)
               and (not self.recurrent_memory or "segment_len" in self.recurrent_memory),
               "model.recurrent_memory", f"a dict (empty: off) with segment_len and optionally "
               f"{', '.join(rmt_keys[1:])}", self.recurrent_memory)
        _check(not (self.recurrent_memory and self.max_positions), "model.max_positions",
               "0 with model.recurrent_memory (each segment restarts at position 0)",
               self.max_positions)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "delayed_recall"
    batch_size: int = 32             # global batch (all processes, all micro-batches)
    seq_len: int = 64
    data_dir: str | None = None
    loader: str = "auto"             # auto/data: train.data; synthetic: in memory, rows by process
    eval_batches: int = 4
    eval_seq_len: int = 0            # > 0: a second final eval at this length (extrapolation)
    task_options: dict = dataclasses.field(default_factory=lambda: {"vocab_size": 16,
                                                                    "delay": 4})

    def __post_init__(self):
        _positive("data", self, "batch_size", "seq_len", "eval_batches")
        _check(isinstance(self.eval_seq_len, int) and not isinstance(self.eval_seq_len, bool)
               and self.eval_seq_len >= 0, "data.eval_seq_len", "an integer >= 0 (0: off)",
               self.eval_seq_len)
        _check(isinstance(self.task, str) and self.task != "", "data.task", "a task name",
               self.task)
        from train.data import KNOWN_TASKS
        _check(self.task in KNOWN_TASKS or self.task.startswith("tfds:"), "data.task",
               f"one of {', '.join(KNOWN_TASKS)}", self.task)
        _check(self.loader in ("auto", "synthetic", "data"), "data.loader",
               "one of 'auto', 'synthetic', 'data'", self.loader)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.0   # cosine decays to learning_rate * this
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.01
    decay_embeddings: bool = True
    grad_clip: float = 1.0
    grad_accum: int = 1              # micro-batches per step (lax.scan); batch_size % it == 0
    # learning-rate multipliers per parameter group (groups: memzoo/layers.py PARAM_GROUPS,
    # tagged where each parameter is made)
    lr_multipliers: dict = dataclasses.field(default_factory=lambda: {"ssm_dynamics": 1.0})
    # Language models: time steps per cross-entropy chunk (memzoo.losses; 0: the whole sequence
    # at once), so [batch, time, vocab] float32 logits never exist; and PaLM's z-loss weight.
    loss_chunk: int = 0
    z_loss: float = 0.0
    # Weight of the auxiliary losses that layers sow as nnx.Intermediate "aux_loss" (a route's
    # load balancing: MoM, memory_bank with sow_aux_loss=True); the train loss adds weight *
    # their sum. 0: nothing is captured (and a layer that sows is refused).
    aux_loss_weight: float = 0.0

    def __post_init__(self):
        _positive("optim", self, "steps", "grad_accum")
        _check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0, "optim.loss_chunk",
               "an integer >= 0 (0: no chunking)", self.loss_chunk)
        _check(isinstance(self.z_loss, (int, float)) and self.z_loss >= 0, "optim.z_loss",
               "a number >= 0", self.z_loss)
        _check(isinstance(self.aux_loss_weight, (int, float))
               and not isinstance(self.aux_loss_weight, bool) and self.aux_loss_weight >= 0,
               "optim.aux_loss_weight", "a number >= 0", self.aux_loss_weight)
        _check(isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0,
               "optim.learning_rate", "a number > 0", self.learning_rate)
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0", self.weight_decay)
        _check(self.grad_clip > 0, "optim.grad_clip", "a number > 0", self.grad_clip)
        _check(0 <= self.final_lr_fraction <= 1, "optim.final_lr_fraction", "a number in [0, 1]",
               self.final_lr_fraction)
        for group, mult in self.lr_multipliers.items():
            _check(isinstance(mult, (int, float)) and mult >= 0,
                   f"optim.lr_multipliers.{group}", "a number >= 0", mult)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device counts per mesh axis; -1 takes the devices the other axes leave."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        for name, size in zip(("data", "fsdp", "tensor", "sequence"), sizes):
            _check(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{name}",
                   "a positive integer or -1", size)
        _check(sizes.count(-1) <= 1, "mesh", "at most one axis of size -1", sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100                 # steps between saves; 0 turns checkpoints off
    keep: int = 3
    resume: str = "auto"             # auto: resume when a checkpoint exists; require; never
    async_save: bool = True

    def __post_init__(self):
        _check(isinstance(self.every, int) and self.every >= 0, "checkpoint.every",
               "an integer >= 0", self.every)
        _positive("checkpoint", self, "keep")
        _check(self.resume in ("auto", "require", "never"), "checkpoint.resume",
               "one of 'auto', 'require', 'never'", self.resume)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 25
    eval_every: int = 0              # 0: evaluate only at the end
    progress: bool = True
    tensorboard: bool = True
    profile_start: int = -1          # trace steps [profile_start, profile_stop) when >= 0
    profile_stop: int = -1           # -1: profile_start + 1

    def __post_init__(self):
        _positive("logging", self, "log_every")
        _check(self.profile_start < 0 or self.profile_stop < 0
               or self.profile_stop > self.profile_start,
               "logging.profile_stop", f"a step > profile_start ({self.profile_start})",
               self.profile_stop)


EVAL_TEXT = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Language-model evaluation (train/eval.py): run by `python -m train.eval --run_dir DIR` on
    a run's latest checkpoint, and at the end of `python -m train` when `enabled`."""
    enabled: bool = False            # evaluate at the end of training (next-token tasks only)
    split: str = "validation"        # the held-out split
    batches: int = 0                 # batches per length; 0: data.eval_batches
    # Extra lengths as multiples of data.seq_len (length extrapolation); each batch there has
    # 1/m of the rows, so a batch holds as many tokens as at the training length.
    length_multiples: tuple[int, ...] = (2, 4, 8)
    position_buckets: int = 24       # loss by position: log-spaced buckets
    # "auto": bits per byte and needle retrieval when the task is text (has a codec, see
    # train/data/codec.py), skipped otherwise; "on": required (an error elsewhere); "off": never
    text: str = "auto"
    needle_lengths: tuple[int, ...] = ()   # prompt lengths in tokens; (): every evaluated length
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 4           # haystacks per (length, depth); 0 turns needles off
    plot: bool = True                # loss_by_position.png, when matplotlib is installed

    def __post_init__(self):
        _check(self.split in ("validation", "test"), "eval.split", "'validation' or 'test'",
               self.split)
        _check(self.text in EVAL_TEXT, "eval.text", f"one of {EVAL_TEXT}", self.text)
        for name in ("batches", "needle_trials"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                   f"eval.{name}", "an integer >= 0", value)
        _positive("eval", self, "position_buckets")
        _check(all(m >= 2 for m in self.length_multiples)
               and len(set(self.length_multiples)) == len(self.length_multiples),
               "eval.length_multiples", "distinct integers >= 2, e.g. 2,4,8 (or empty)",
               self.length_multiples)
        _check(all(n >= 1 for n in self.needle_lengths), "eval.needle_lengths",
               "positive integers (token counts), or empty for every evaluated length",
               self.needle_lengths)
        _check(all(0.0 <= x <= 1.0 for x in self.needle_depths)
               and (self.needle_depths or not self.needle_trials), "eval.needle_depths",
               "numbers in [0, 1] (0: the needle first, 1: just before the question)",
               self.needle_depths)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "delayed_recall_s4d"
    seed: int = 0
    run_dir: str | None = None       # None: runs/<name>
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        _check(self.data.batch_size % self.optim.grad_accum == 0, "optim.grad_accum",
               f"a divisor of data.batch_size ({self.data.batch_size})", self.optim.grad_accum)
        longest = max(self.data.seq_len, self.data.eval_seq_len)
        _check(not self.model.max_positions or self.model.max_positions >= longest,
               "model.max_positions", f"0 or at least the longest sequence ({longest}: "
               "data.seq_len / data.eval_seq_len)", self.model.max_positions)
        if self.eval.enabled or self.eval.text == "on":
            _check_eval_task(self)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, key: str, value: Any) -> "TrainConfig":
        """A copy with the dotted `key` set; a string `value` is parsed to the field's type."""
        return _override(self, key.split("."), value, key)

    def overrides(self, items: Mapping[str, Any]) -> "TrainConfig":
        config = self
        for key, value in items.items():
            config = config.override(key, value)
        return config


def _check_eval_task(config: TrainConfig) -> None:
    """What can be told from the task's name: a classification task has no next token, and
    eval.text=on needs a text task. Tasks known only once loaded fail when evaluated."""
    from train.data import TASKS
    from train.data.codec import CODECS
    task = config.data.task
    spec = TASKS.get(task)
    _check(spec is None or spec.loss == "next_token", "eval.enabled",
           f"false for task {task!r}: it classifies whole sequences, and the language-model "
           "evaluation needs a next-token task", config.eval.enabled)
    _check(config.eval.text != "on" or task in CODECS, "eval.text",
           f"'auto' or 'off' for task {task!r}, which is not text (bits per byte and needle "
           f"retrieval need one of: {', '.join(sorted(CODECS))})", config.eval.text)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(prefix: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(known)}"


def _override(obj, parts: list[str], value: Any, full_key: str):
    types_ = _field_types(type(obj))
    name, rest = parts[0], parts[1:]
    prefix = full_key[: len(full_key) - len(".".join(parts))]
    if name not in types_:
        raise ConfigError(f"unknown config key '{full_key}'" + _suggest(prefix, name, types_))
    annotation, current = types_[name], getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if not rest:
            raise ConfigError(f"config key '{full_key}' is a section; set one of its keys "
                              f"({', '.join(_field_types(type(current)))})")
        new = _override(current, rest, value, full_key)
    elif isinstance(current, dict) and rest:
        # dict-valued fields (mixer_options, task_options, lr_multipliers) take free-form keys
        new = dict(current)
        new[".".join(rest)] = _parse_loose(value) if isinstance(value, str) else value
    elif rest:
        raise ConfigError(f"unknown config key '{full_key}': '{prefix}{name}' has no sub-keys")
    else:
        new = _parse(full_key, annotation, value)
    try:
        return dataclasses.replace(obj, **{name: new})
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key '{full_key}': {err}") from None


def _parse_loose(text: str) -> Any:
    """JSON when it parses (numbers, true/false, objects), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_tuple(key: str, annotation, value: Any) -> tuple:
    """`tuple[int, ...]` keys: "2,4,8", "[2, 4, 8]" or "()" on the command line; a list from a
    checkpoint's saved config (JSON has no tuples)."""
    item_type = typing.get_args(annotation)[0]
    if isinstance(value, str):
        text = value.strip()
        if text[:1] + text[-1:] in ("[]", "()"):
            text = text[1:-1]
        items = [part for part in (p.strip() for p in text.split(",")) if part]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"config key '{key}': expected a comma-separated list of "
                          f"{item_type.__name__}, got {value!r}")
    try:
        return tuple(_parse(key, item_type, item) for item in items)
    except ConfigError:
        raise ConfigError(f"config key '{key}': expected a comma-separated list of "
                          f"{item_type.__name__}, got {value!r}") from None


def _parse(key: str, annotation, value: Any) -> Any:
    if typing.get_origin(annotation) is tuple:
        return _parse_tuple(key, annotation, value)
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        base = next(a for a in args if a is not type(None))
    if not isinstance(value, str):
        ok = (value is None and optional) or (isinstance(value, base) and not (
            base is int and isinstance(value, bool))) or (base is float and isinstance(value, int))
        _check(ok, key, base.__name__ + (" or None" if optional else ""), value)
        return float(value) if base is float and value is not None else value
    text = value.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is dict:
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
        return text
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"config key '{key}': expected {base.__name__}"
                          f"{' (a JSON object)' if base is dict else ''}, got {value!r}") from None


def schema(config: TrainConfig | None = None) -> list[tuple[str, str, Any]]:
    """(dotted key, type, value in `config`) for every leaf key: what --help lists."""
    rows = []

    def walk(prefix, obj):
        for name, annotation in _field_types(type(obj)).items():
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{name}.", value)
            else:
                type_name = (str(annotation) if typing.get_origin(annotation) is tuple else
                             getattr(annotation, "__name__",
                                     str(annotation).replace("typing.", "")))
                rows.append((prefix + name, type_name, value))
    walk("", config or TrainConfig())
    return rows


def short_keys(config: TrainConfig | None = None) -> dict[str, list[str]]:
    """Leaf name -> its dotted keys, so `--steps 500` can mean `--set optim.steps=500`."""
    table: dict[str, list[str]] = {}
    for key, _, _ in schema(config):
        table.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    return table


def from_dict(data: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from a nested dict (e.g. a checkpoint's saved config). Each section is built
    whole and the sections joined once, so the checks across keys (model.max_positions against
    data.seq_len) see the saved values together, never a half-applied mix with the defaults."""
    config = base or TrainConfig()
    top: dict[str, Any] = {}
    for name, value in data.items():
        current = getattr(config, name, None)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            for key, item in value.items():
                current = _override(current, [key], item, f"{name}.{key}")
            top[name] = current
        else:
            # top-level keys go through the same typed path (unknown ones fail there)
            top[name] = getattr(_override(config, [name], value, name), name)
    try:
        return dataclasses.replace(config, **top)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
