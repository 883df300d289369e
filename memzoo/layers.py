"""Small layers shared by every family: parameters with logical sharding axes, Linear, norms,
MLP and GLU.

Parameters are float32 whatever the compute `dtype`; each carries logical axis names
(`out_sharding` metadata, e.g. ("embed", "mlp")) that a mesh rule table maps to mesh axes when a
training loop shards the model (`nnx.get_partition_spec`). Names used here:
  "embed" model width, "mlp" hidden width, "state" SSM state, "norm" norm scales.

Each parameter also says, where it is made, which optimizer group it belongs to
(`param_group` metadata, one of PARAM_GROUPS) and whether weight decay applies (`weight_decay`
metadata). The training loop reads these tags (`param_group_of`, `weight_decay_of`), never the
parameter's name, so a parameter keeps its role whatever attribute it is stored under.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.typing import LogicalAxes

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # jax.nn.gelu's default is the tanh approximation (Gemma's GeGLU); "gelu_tanh" spells it out
    # for converters from PyTorch, where a bare "gelu" means the exact (erf) one.
    "gelu": jax.nn.gelu,
    "gelu_tanh": jax.nn.gelu,
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation: unknown {name!r}; known: {', '.join(ACTIVATIONS)}") from None


# Optimizer groups a parameter can be tagged with (configs' optim.lr_multipliers keys).
PARAM_GROUPS: dict[str, str] = {
    "default": "everything else",
    # Step sizes, state eigenvalues and decay biases set the memory's time scales: weight decay
    # towards 0 would shorten (or, for dt biases, reshape) every memory, so the group is never
    # decayed and may take its own learning rate (Mamba's A_log/dt_bias, fla's
    # _no_weight_decay on A_log and dt_bias).
    "ssm_dynamics": "SSM time scales: A / A_log, dt or step biases, decay biases",
    # Product-key memory value tables: each row gets a gradient only when read (k rows per
    # token), so they want a larger learning rate than the dense weights.
    "memory_values": "product-key memory value tables",
}
GROUP_KEY, DECAY_KEY = "param_group", "weight_decay"


def param(value: jax.Array, axes: LogicalAxes, *, group: str = "default",
          weight_decay: bool = True) -> nnx.Param:
    """A trainable parameter with logical sharding axes and its optimizer tags (the one place
    that spells the metadata).

    `group`: a key of PARAM_GROUPS; a parameter outside "default" is never weight-decayed.
    `weight_decay=False` spares a default-group parameter from decay (e.g. Mamba's D skip).

    flax 0.12 names the sharding metadata `out_sharding` (`sharding` and `sharding_names` are
    deprecated aliases). Eager sharding is off: it would need a mesh while the module is built,
    and the names are logical; the training loop resolves them with its rule table. The tags
    are plain metadata, so they follow the Variable through nnx.split/merge, eval_shape,
    jax.tree.map (an orbax restore target) and nnx.bridge.ToLinen (NNXMeta.metadata).
    """
    if len(axes) != value.ndim:
        raise ValueError(f"param: {len(axes)} axis names {axes} for a rank-{value.ndim} value")
    if group not in PARAM_GROUPS:
        raise ValueError(f"param: group must be one of {tuple(PARAM_GROUPS)}, got {group!r}")
    if not isinstance(weight_decay, bool):
        raise ValueError(f"param: weight_decay must be a bool, got {weight_decay!r}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False,
                     **{GROUP_KEY: group, DECAY_KEY: weight_decay})


def _metadata(variable) -> dict:
    """The metadata of an nnx Variable, or of the box nnx.bridge.ToLinen puts in Linen trees."""
    if isinstance(variable, nnx.Variable):
        return variable.get_metadata()
    return dict(getattr(variable, "metadata", None) or {})


def param_group_of(variable) -> str:
    """The optimizer group a parameter was tagged with ("default" when untagged, e.g. a Linen
    module's parameter brought in through nnx.bridge.ToNNX)."""
    return _metadata(variable).get(GROUP_KEY, "default")


def weight_decay_of(variable) -> bool:
    """Whether the parameter's own tag allows weight decay (True when untagged)."""
    return bool(_metadata(variable).get(DECAY_KEY, True))


_ACTIVATION_CONSTRAINT: contextvars.ContextVar = contextvars.ContextVar(
    "memzoo_activation_constraint", default=None)


@contextlib.contextmanager
def activation_sharding(constrain: Callable[[jax.Array, LogicalAxes], jax.Array]):
    """Inside, `constrain_activation(x, names)` is `constrain(x, names)`: how a training loop pins
    the residual stream's layout (its logical names resolved by its own rule table). Without
    it, GSPMD propagation may meet a batch-sharded activation and an fsdp-sharded weight and
    gather the batch instead of the weight. Read at trace time."""
    token = _ACTIVATION_CONSTRAINT.set(constrain)
    try:
        yield
    finally:
        _ACTIVATION_CONSTRAINT.reset(token)


def constrain_activation(x: jax.Array, names: LogicalAxes) -> jax.Array:
    """`x` under the innermost `activation_sharding` constraint; `x` itself outside one."""
    constrain = _ACTIVATION_CONSTRAINT.get()
    return x if constrain is None else constrain(x, names)


class Buffer(nnx.Variable):
    """A constant the module needs (e.g. HiPPO's A and B): saved with the model, never trained."""


def check_input(owner: str, name: str, x, *, ndim: int, width: int | None = None,
                legend: str = "[batch, time, d_model]") -> None:
    """A bad call fails here, naming the argument, instead of deep inside a scan."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{owner}: `{name}` must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{owner}: `{name}` must have rank {ndim} {legend}, "
                         f"got shape {tuple(x.shape)}")
    if width is not None and x.shape[-1] != width:
        raise ValueError(f"{owner}: `{name}` last dimension must be d_model={width} {legend}, "
                         f"got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{owner}: `{name}` must be floating, got {x.dtype}")


class Linear(nnx.Module):
    """y = x W + b over the last axis; W [in, out] float32, computed in `dtype`.

    >>> lin = Linear(4, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    >>> lin(jnp.ones((2, 4))).shape
    (2, 8)
    """

    def __init__(self, in_features: int, out_features: int, *, axes: LogicalAxes = ("embed", "mlp"),
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer = nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.kernel = param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                            axes)
        self.bias = (param(jnp.zeros((out_features,), param_dtype), axes[-1:]) if use_bias
                     else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + jnp.broadcast_to(self.bias[...].astype(self.dtype), y.shape)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, statistics in float32 (bfloat16 means lose too much)."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # same signature as every layer; nothing random
        self.epsilon, self.dtype = epsilon, dtype
        self.scale = param(jnp.ones((num_features,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(ms + self.epsilon)
        return (y * jnp.broadcast_to(self.scale[...], y.shape)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, statistics in float32."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.epsilon, self.dtype = epsilon, dtype
        self.scale = param(jnp.ones((num_features,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((num_features,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * jnp.broadcast_to(self.scale[...], y.shape) + jnp.broadcast_to(self.bias[...],
                                                                               y.shape)
        return y.astype(self.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def norm(kind: str, num_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs,
         epsilon: float | None = None) -> nnx.Module:
    """A norm by name; `epsilon=None` keeps the class's default."""
    try:
        cls = NORMS[kind]
    except KeyError:
        raise ValueError(f"norm: unknown {kind!r}; known: {', '.join(NORMS)}") from None
    if epsilon is None:
        return cls(num_features, dtype=dtype, rngs=rngs)
    return cls(num_features, epsilon=float(epsilon), dtype=dtype, rngs=rngs)


class GLU(nnx.Module):
    """Gated linear unit: act(x W_g) * (x W_v). activation "sigmoid" is Dauphin et al.'s GLU,
    "silu" SwiGLU, "gelu" GeGLU. One [in, 2*out] matmul feeds both halves.
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str = "sigmoid",
                 use_bias: bool = True, axes: LogicalAxes = ("embed", "mlp"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act_name, self.act = activation, get_activation(activation)
        self.proj = Linear(in_features, 2 * out_features, axes=axes, use_bias=use_bias,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, value = jnp.split(self.proj(x), 2, axis=-1)
        return self.act(gate) * value


class MLP(nnx.Module):
    """d_model -> hidden -> d_model; `gated=True` makes the first layer a GLU (SwiGLU-style).

    >>> mlp = MLP(8, 16, activation="silu", gated=True, rngs=nnx.Rngs(0))
    >>> mlp(jnp.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(self, d_model: int, hidden: int | None = None, *, activation: str = "gelu",
                 gated: bool = False, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = hidden or 4 * d_model
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if gated:
            self.up = GLU(d_model, hidden, activation=activation, axes=("embed", "mlp"), **kw)
            self.act = None
        else:
            self.up = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
            self.act = get_activation(activation)
        self.down = Linear(hidden, d_model, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        if self.act is not None:
            h = self.act(h)
        return self.down(h)


def balance_loss(assign, probs):
    """Switch's load-balancing loss (Fedus et al., 2022), n sum_i f_i P_i over every leading
    axis: assign [..., n] each token's pick of n experts (summing to 1 per token; a top-k pick
    counts 1/k), probs [..., n] the router's probabilities. 1 when the picks and probabilities are uniform, n when all tokens pick one."""
    axes = tuple(range(assign.ndim - 1))
    f = jnp.mean(assign.astype(jnp.float32), axis=axes)
    return assign.shape[-1] * jnp.sum(f * jnp.mean(probs.astype(jnp.float32), axis=axes))
