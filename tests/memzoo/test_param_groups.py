"""Optimizer tags on parameters (memzoo.layers.param group= / weight_decay=): every mixer tags its
SSM dynamics where it makes them, whatever attribute they are stored under."""
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import memzoo
from memzoo import layers

D = 8

# Per registered mixer, the parameters that set the memory's time scales (paths in the mixer).
# Decided from the papers and their code: Mamba / Mamba-2 exempt A_log and dt_bias from weight
# decay (D too, but D is a skip weight, not a time scale: tagged weight_decay=False instead);
# fla's Gated DeltaNet exempts A_log and dt_bias, which memzoo stores as log_A and the decay
# projection's bias; S4D's and S5's step and eigenvalue parameters; GLA's gate bias is the
# forgetting rate's offset (a dt bias in all but name). Mixers without a learned time scale have
# none: attention, linear attention, DeltaNet, RetNet (fixed decays), the HiPPO cell (A, B are
# buffers). The neural memories (Titans, Miras) keep their inner optimizer's rate, momentum and
# forgetting offsets in one gate_proj bias vector: the memory's time scales, tagged as a whole.
DYNAMICS: dict[str, set[str]] = {
    "attention": set(),
    "linear_attention": set(),
    "retnet": set(),
    "deltanet": set(),
    "gated_deltanet": {"log_A", "decay_proj/bias"},
    "gated_deltaproduct": {"log_A", "decay_proj/bias"},
    # KDA: per-head log_A and the per-channel dt bias (the decay bottleneck's output bias).
    "kda": {"log_A", "decay_up/bias"},
    # Comba: Gated DeltaNet's decay (the inner decay and D are feedback gains, not time scales).
    "comba": {"log_A", "decay_proj/bias"},
    # RWKV-7: the decay offset w_0 (log w = -e^-1/2 sigmoid(w_0 + lora)), as RWKV-6's d_0.
    "rwkv7": {"decay_bias"},
    "mom": {"log_A", "decay_proj/bias"},
    "gla": {"gate_bias"},
    # HGRN / HGRN-2: the forget gate's bias (the forgetting offset, as GLA's gate bias).
    "hgrn": {"forget_bias"},
    "hgrn2": {"forget_bias"},
    "based": set(),  # no learned time scale (the window is a constant)
    "rebased": set(),
    "gsa": {"gate_bias"},  # the slots' forget gate bias, as GLA's
    # RWKV-6: the decay offset d_0 (w = exp(-exp(d_0 + lora))), the forgetting time scale.
    "rwkv6": {"decay_bias"},
    # mLSTM: the input and forget gate biases (forget bias linspace(3, 6): the time scales).
    "mlstm": {"igate_bias", "fgate_bias"},
    # sLSTM: the forget gate's bias (linspace(3, 6): the time scales; no input-gate bias).
    "slstm": {"fgate_bias"},
    # TTT: the inner learning rate's bias (eta = base_lr sigmoid(x w + b) / (2 head_dim)).
    "ttt_linear": {"gate_proj/bias"},
    "ttt_mlp": {"gate_proj/bias"},
    "hippo_rnn": set(),
    "hopfield": set(),
    # memzoo.memories: JRT as linear attention
    "jrt": set(),
    "local_linear_attention": set(),
    "hcam": set(),
    "ttm": set(),
    # NTM: addressing is content plus a per-step shift/sharpen, no learned forgetting rate.
    "ntm": set(),
    # MemN2N: temporal encoding is a learned position table, not a decay.
    "memn2n": set(),
    # the leaky average of the keys sets each unit's time scale
    "memory_mosaic": {"leak"},
    "s4d": {"core/log_dt", "core/log_neg_a_real", "core/a_imag"},
    "s5": {"core/log_step", "core/log_neg_lambda_real", "core/lambda_imag"},
    "mamba": {"A_log", "dt_bias"},
    "mamba2": {"A_log", "dt_bias"},
    # Griffin's RG-LRU: Lambda (log a = -c softplus(Lambda) r) and the gate biases, which set
    # where the recurrence and input gates sit at initialisation.
    "rglru": {"a_param", "a_gate/bias", "input_gate/bias"},
    "neural_memory": {"gate_proj/bias"},
    "moneta": {"gate_proj/bias"},
    "yaad": {"gate_proj/bias"},
    "memora": {"gate_proj/bias"},
    "titans_mac": {"memory/gate_proj/bias"},
    "titans_mag": {"memory/gate_proj/bias"},
    "titans_mal": {"memory/gate_proj/bias"},
}
# Default-group parameters that must not be decayed by their own tag.
NO_DECAY_TAGS: dict[str, set[str]] = {"mamba": {"D_skip"}, "mamba2": {"D_skip", "norm/scale"}}
# RWKV-6's official training spares its time_* parameters (lerp mu / lambda, bonus) from decay.
NO_DECAY_TAGS["rwkv6"] = {"lerp_mu", "lerp_bias", "bonus"}
# Comba's output correction D (fla: _no_weight_decay); RWKV-7's time_* analogues as RWKV-6's.
NO_DECAY_TAGS["comba"] = {"correction"}
NO_DECAY_TAGS["rwkv7"] = {"lerp_mu", "a_bias", "v_bias", "k_k", "k_a", "r_k"}


def build(name: str):
    takes = memzoo.accepts_keyword(getattr(memzoo.MIXERS[name], "__init__"), "state_size")
    return nnx.eval_shape(lambda: memzoo.build_mixer(
        name, D, rngs=nnx.Rngs(0), **({"state_size": 8} if takes else {})))


def tags(module) -> dict[str, tuple[str, bool]]:
    return {"/".join(map(str, path)): (layers.param_group_of(v), layers.weight_decay_of(v))
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_the_table_covers_every_registered_mixer():
    # A new mixer must state which of its parameters are dynamics.
    assert set(DYNAMICS) == set(memzoo.MIXERS)


@pytest.mark.parametrize("name", sorted(memzoo.MIXERS))
def test_dynamics_are_tagged_and_only_they(name):
    found = tags(build(name))
    for path, (group, _) in found.items():
        assert group in layers.PARAM_GROUPS, (path, group)
    assert {p for p, (g, _) in found.items() if g == "ssm_dynamics"} == DYNAMICS[name]
    assert {p for p, (g, d) in found.items() if g == "default" and not d} \
        == NO_DECAY_TAGS.get(name, set())


def test_pkm_value_table_is_in_its_group():
    from memzoo.memory_layers.product_key import ProductKeyMemory
    found = tags(nnx.eval_shape(lambda: ProductKeyMemory(D, rngs=nnx.Rngs(0))))
    assert {p for p, (g, _) in found.items() if g == "memory_values"} == {"values/memory_values"}


def test_tags_survive_split_merge_and_tree_maps():
    mixer = memzoo.build_mixer("gated_deltanet", D, num_heads=2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
    # a checkpoint restore target is the params' tree mapped to ShapeDtypeStructs
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    assert tags(nnx.merge(graphdef, target, rest)) == tags(mixer)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3, D)))))(mixer)
    flat = {"/".join(map(str, p)): layers.param_group_of(v) for p, v in nnx.to_flat_state(grads)}
    assert flat["decay_proj/bias"] == flat["log_A"] == "ssm_dynamics"


def test_tags_reach_linen_through_the_bridge():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nnx.bridge.to_linen(memzoo.MIXERS["gated_deltanet"], D, num_heads=2,
                                       name="mixer")(x)

    variables = Model().init(jax.random.key(0), jnp.ones((1, 3, D)))
    boxes = variables["params"]["mixer"]
    assert layers.param_group_of(boxes["decay_proj"]["bias"]) == "ssm_dynamics"
    assert layers.param_group_of(boxes["log_A"]) == "ssm_dynamics"
    assert layers.param_group_of(boxes["wq"]) == "default"


def test_bad_tags_are_clear_errors():
    with pytest.raises(ValueError,
                       match=r"param: group must be one of .*'ssm_dynamics'.*'dynamics'"):
        layers.param(jnp.zeros((2,)), ("embed",), group="dynamics")
    with pytest.raises(ValueError, match="param: weight_decay must be a bool"):
        layers.param(jnp.zeros((2,)), ("embed",), weight_decay="no")


# -- the dynamics keep float32 under bfloat16 compute ------------------------------------------
# A decay exp(-exp(A_log) dt) rounded to bfloat16 (8 bits of mantissa) forgets over about 256
# steps whatever A_log says: bf16 runs must read these parameters in float32. Checked on the
# traced program: no view of a dynamics parameter (reshapes, slices, broadcasts of it, through
# jit, scan, custom VJP and remat boundaries) is converted to a 16-bit float.
_VIEWS = {"reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
          "dynamic_slice", "copy", "copy_p", "rev", "select_n", "pjit", "concatenate"}
_LOW = {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns") and hasattr(inner, "invars"):
                yield inner


def _low_casts(jaxpr, tracked: dict, found: list) -> None:
    """Appends (parameter, primitive) for each 16-bit cast of a tracked variable's view."""
    for eqn in jaxpr.eqns:
        names = {tracked[v] for v in eqn.invars if not hasattr(v, "val") and v in tracked}
        if not names:
            continue
        name = eqn.primitive.name
        if name == "convert_element_type" and jnp.dtype(eqn.params["new_dtype"]) in _LOW:
            found.extend((n, name) for n in names)
        for inner in _sub_jaxprs(eqn):
            # call-like primitives (jit, custom_vjp/jvp, remat, scan) pass operands positionally;
            # cond's branches take the operands after the index
            offset = len(eqn.invars) - len(inner.invars)
            if offset >= 0:
                sub = {iv: tracked[ov] for ov, iv in zip(eqn.invars[offset:], inner.invars)
                       if not hasattr(ov, "val") and ov in tracked}
                _low_casts(inner, sub, found)
        if name in _VIEWS or name == "convert_element_type":
            for out in eqn.outvars:
                tracked[out] = sorted(names)[0]


@pytest.mark.parametrize("name", sorted(n for n, d in DYNAMICS.items() if d))
def test_dynamics_are_read_in_float32_under_bfloat16_compute(name):
    takes = memzoo.accepts_keyword(getattr(memzoo.MIXERS[name], "__init__"), "state_size")
    mixer = memzoo.build_mixer(name, D, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                               **({"state_size": 8} if takes else {}))
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
             .removesuffix("/value") for path, _ in flat]
    assert all(jnp.dtype(leaf.dtype) == jnp.float32 for _, leaf in flat)   # master weights

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    x = jax.random.normal(jax.random.key(1), (2, 16, D), jnp.bfloat16)
    closed = jax.make_jaxpr(forward)(params, x)
    invars = closed.jaxpr.invars[:len(flat)]
    tracked = {v: p for v, p in zip(invars, paths) if p in DYNAMICS[name]}
    assert set(tracked.values()) == DYNAMICS[name], (sorted(tracked.values()), paths)
    found: list = []
    _low_casts(closed.jaxpr, tracked, found)
    assert not found, f"{name}: dynamics cast to 16 bits: {sorted(set(found))}"


def test_the_cast_check_finds_a_cast_behind_jit_and_scan():
    """The walker above is only as good as its reach: a view of a tracked parameter cast to
    bfloat16 inside a scan is found, behind jit too; a float32 use of it is not reported."""
    @jax.jit
    def good(a, xs):
        def body(h, x_t):
            return jnp.exp(-jnp.exp(a.reshape(-1))) * h + x_t, h    # decay in float32
        return jax.lax.scan(body, jnp.zeros_like(xs[0]), xs)[0]

    @jax.jit
    def bad(a, xs):
        def body(h, x_t):
            return h * a.reshape(1, -1)[0].astype(jnp.bfloat16) + x_t, h
        return jax.lax.scan(body, jnp.zeros_like(xs[0]), xs.astype(jnp.bfloat16))[0]

    args = (jnp.zeros((4,)), jnp.ones((3, 4)))
    for program, expected in ((good, []), (bad, [("log_a", "convert_element_type")]),
                              (lambda a, x: (good(a, x), bad(a, x)),
                               [("log_a", "convert_element_type")])):
        jaxpr = jax.make_jaxpr(program)(*args).jaxpr
        found: list = []
        _low_casts(jaxpr, {jaxpr.invars[0]: "log_a"}, found)
        assert found == expected
