"""TTT-Linear and TTT-MLP (Sun et al., 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States"), the "ttt_linear" and "ttt_mlp" mixers: configurations of the
neural-memory core (core.py), not new machinery.

Per head, views x_K = x theta_K, x_V = x theta_V, x_Q = x theta_Q; the hidden state is the
weights W of an inner model with a residual layer norm,

    f(x; W) = x + LN(f_res(x; W)) * gamma + beta,   f_res = x W_1 + b_1 (Linear)
                                                     or gelu(x W_1 + b_1) W_2 + b_2 (MLP, 4x)

trained on the reconstruction loss l(W; x_t) = ||f(x_K; W) - x_V||^2 (equivalently LN(f_res)
against the target x_V - x_K) by mini-batch gradient descent: inside a mini-batch of b tokens
(the core's chunk) every gradient is taken at the mini-batch's first weights W_0,

    W_t = W_0 - sum_{s <= t in the mini-batch} eta_s grad l(W_0; x_s),    z_t = f(x_Q,t; W_t)

with a learnable per-token inner learning rate eta(x) = base_lr sigmoid(x w_lr + b_lr) /
(2 head_dim) (the paper's base_lr sigma(.) / head_dim; the 1/2 because the core's l2 bias is
the plain sum of squares, the paper's gradient that of half of it). In the core's terms:
attentional bias "l2", retention "l2" with alpha = 0 (no forgetting), rule "gd", theta = eta,
chunk = mini-batch, and the inner model `MemoryRule(layer_bias=True, residual_norm=True)`: the
norm's gamma, beta (per head) are outer parameters carried as leaves the inner loop does not
train. The initial W_0 are learned (outer) parameters, per head.

Output: y = W_o (LayerNorm(z) * gelu(x W_g)) (the paper's code: post-norm and a gelu gate).
Left out of the official code: RoPE on x_Q, x_K, the learnable 1/position token weights inside a
mini-batch (its `token_idx`: W_t = W_0 - (1/t) sum eta_s g_s), and the Mamba-backbone conv;
`conv_size` adds the core's short conv over q, k, v if wanted.

Decoding, packed documents and the cache are NeuralMemory's (memory.py): token-by-token decoding
re-anchors at mini-batch boundaries, so it equals the chunked form exactly.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from memzoo import layers
from memzoo.linear_attention.common import normal_init
from memzoo.neural_memory import core
from memzoo.neural_memory.memory import NeuralMemory
from memzoo.registry import register_mixer

# The official code's initial inner weights: N(0, 0.02), biases zero, gamma one, beta zero.
INNER_INIT_STD = 0.02


class TTT(NeuralMemory):
    """TTT layer: [b, t, d] -> [b, t, d]; `memory_layers` 1 (TTT-Linear) or 2 (TTT-MLP).

    Options: num_heads (4), head_dim (d_model / num_heads), memory_layers, mlp_expansion (4),
    mini_batch (16: the core's chunk), base_lr (1.0), conv_size (0), norm_eps (1e-6), remat,
    implementation.

    >>> ttt = TTT(8, num_heads=2, mini_batch=4, rngs=nnx.Rngs(0))
    >>> ttt(jnp.ones((1, 6, 8))).shape
    (1, 6, 8)
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 memory_layers: int = 1, mlp_expansion: int = 4, mini_batch: int = 16,
                 base_lr: float = 1.0, conv_size: int = 0, norm_eps: float = 1e-6,
                 remat: bool = True, implementation: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        owner = type(self).__name__
        if memory_layers not in (1, 2):
            raise ValueError(f"{owner}: `memory_layers` must be 1 (TTT-Linear) or 2 (TTT-MLP), "
                             f"got {memory_layers!r}")
        if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or base_lr <= 0:
            raise ValueError(f"{owner}: `base_lr` must be a number > 0, got {base_lr!r}")
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"{owner}: `norm_eps` must be a number > 0, got {norm_eps!r}")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim,
                         memory_layers=memory_layers, memory_expansion=mlp_expansion,
                         chunk_size=mini_batch, conv_size=conv_size, attentional_bias="l2",
                         retention="l2", learning_rule="gd", activation="gelu",
                         use_delta_rule=False, remat=remat, implementation=implementation,
                         dtype=dtype, rngs=rngs)
        self.rule = core.MemoryRule(attentional_bias="l2", retention="l2", learning_rule="gd",
                                    activation="gelu", layer_bias=True, residual_norm=True,
                                    norm_eps=float(norm_eps))
        self.base_lr = float(base_lr)
        H, K = self.num_heads, self.head_dim
        sizes = [K] + [mlp_expansion * K] * (memory_layers - 1) + [K]
        leaves = []
        for i, o in zip(sizes[:-1], sizes[1:]):
            leaves.append(layers.param(INNER_INIT_STD * jax.random.normal(
                rngs.params(), (H, i, o), jnp.float32), ("heads", None, None)))
            leaves.append(layers.param(jnp.zeros((H, 1, o), jnp.float32), ("heads", None, None)))
        leaves.append(layers.param(jnp.ones((H, 1, K), jnp.float32), ("heads", None, None)))
        leaves.append(layers.param(jnp.zeros((H, 1, K), jnp.float32), ("heads", None, None)))
        self.memory_init = nnx.List(leaves)
        # The inner learning rate per head; its bias sets the inner step size (the memory's time
        # scale, as Titans' gate biases): "ssm_dynamics".
        self.gate_proj = layers.Linear(d_model, H, axes=("embed", None),
                                       kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.gate_proj.bias = layers.param(jnp.zeros((H,), jnp.float32), (None,),
                                           group="ssm_dynamics")
        self.out_norm = layers.LayerNorm(H * K, epsilon=1e-6, dtype=dtype)
        self.wg = normal_init(rngs, (d_model, H * K), d_model, ("embed", "mlp"))

    def _inputs(self, x, conv_state, decode: bool, segment_ids=None):
        (q, k, v, _, _, _), new_conv = self._projected(x, conv_state, decode, segment_ids)
        logits = self.gate_proj(x.astype(self.state_dtype)).astype(self.state_dtype)
        theta = self.base_lr * jax.nn.sigmoid(logits) / (2.0 * self.head_dim)
        zero = jnp.zeros_like(theta)
        return (q, k, v, theta, zero, zero), new_conv

    def _projected(self, x, conv_state, decode, segment_ids):
        """NeuralMemory's q, k, v (projections, optional conv) without its L2 norm of q and k:
        TTT's views enter the inner model as they are."""
        b, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        x = x.astype(self.dtype)
        flat = jnp.concatenate([jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
                                .reshape(b, T, H * K) for w in (self.wq, self.wk, self.wv)], -1)
        new_conv = None
        if self.conv_weight is not None:
            w = self.conv_weight[...]
            if decode:
                y, new_conv = pallas_kernels.causal_conv1d_update(flat[:, 0], conv_state, w,
                                                                  activation="silu")
                flat = y[:, None]
            else:
                flat, new_conv = pallas_kernels.causal_conv1d(flat, w, activation="silu",
                                                              initial_state=conv_state,
                                                              segment_ids=segment_ids)
        flat = flat.astype(self.state_dtype)
        q, k, v = (flat[..., i * H * K:(i + 1) * H * K].reshape(b, T, H, K) for i in range(3))
        return (q, k, v, None, None, None), new_conv

    def _output(self, z):
        """LayerNorm over the heads' outputs [b, t, H K]; the gate and W_o come in `forward`,
        which has x."""
        b, T = z.shape[:2]
        return self.out_norm(z.astype(self.dtype).reshape(b, T, -1))

    def forward(self, x, cache=None, *, decode: bool = False, segment_ids=None):
        z, z_anchor, new = super().forward(x, cache, decode=decode, segment_ids=segment_ids)
        gate = jax.nn.gelu(x.astype(self.dtype) @ self.wg[...].astype(self.dtype))
        wo = self.wo[...].astype(self.dtype).reshape(-1, self.d_model)
        project = lambda z: None if z is None else (z * gate) @ wo
        return project(z), project(z_anchor), new


def _variant(name: str, memory_layers: int, doc: str):
    def build(d_model: int, *, rngs: nnx.Rngs, **options) -> TTT:
        if "memory_layers" in options:
            raise ValueError(f"{name}: `memory_layers` is fixed ({memory_layers}) by the variant")
        return TTT(d_model, memory_layers=memory_layers, rngs=rngs, **options)
    build.__name__, build.__doc__ = name, doc
    # TTT's keywords instead of the catch-all, so memzoo.models routes only those here.
    own = [p for p in inspect.signature(TTT.__init__).parameters.values()
           if p.name not in ("self", "memory_layers")]
    build.__signature__ = inspect.Signature(own)
    return register_mixer(name)(build)


ttt_linear = _variant("ttt_linear", 1, "TTT-Linear: a linear inner model, f_res = x W + b.")
ttt_mlp = _variant("ttt_mlp", 2, "TTT-MLP: a 2-layer GELU MLP inner model (mlp_expansion x).")
