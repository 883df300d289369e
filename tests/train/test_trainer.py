"""The sharded step: one device and eight (data x fsdp x tensor = 2 x 2 x 2) give the same
losses; gradient accumulation equals the doubled batch; the weight-decay mask and learning-rate
groups hit the right parameters; bfloat16 compute keeps float32 parameters and moments."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import configs
from tests.train.helpers import tiny
from train import mesh as mesh_lib
from train import trainer as trainer_lib
from train.input import build


def _batches(config, n):
    it, _ = build(config.data.task, loader="synthetic", split="train",
                  batch_size=config.data.batch_size, seq_len=config.data.seq_len, seed=0,
                  **config.data.task_options)
    return [next(it) for _ in range(n)]


def _steps(config, devices, batches, mesh_config=None):
    mesh = mesh_lib.make_mesh(mesh_config or config.mesh, devices)
    t = trainer_lib.Trainer(config, mesh, vocab_size=config.data.task_options["vocab_size"])
    state, out = t.init(), []
    for b in batches:
        state, m = t.train_step(state, t.shard_batch(b))
        out.append(float(m["loss"]))
    return out, state, t


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    config = tiny(tmp_path_factory.mktemp("one"), "optim.steps=3")
    return config, _steps(config, jax.devices()[:1], _batches(config, 3))


def test_eight_devices_equal_one(one_device):
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 host devices"
    config, (ref, _, _) = one_device
    got, state, t = _steps(config, jax.devices(), _batches(config, 3),
                           configs.MeshConfig(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # the table was applied: the tied embedding [vocab, embed] is split over tensor and fsdp
    assert state["params"]["embed"][...].sharding.spec == P("tensor", "fsdp")
    mu = state["opt"][1].inner_states["default"].inner_state[0].mu["embed"][...]
    assert mu.sharding.spec == P("tensor", "fsdp")      # Adam moments follow their parameter
    assert t.flops_per_step and t.flops_per_step > 0


def test_grad_accumulation_equals_double_batch(one_device, tmp_path):
    config, _ = one_device
    b = _batches(config.overrides({"data.batch_size": 16}), 1)
    _, whole, _ = _steps(config.overrides({"data.batch_size": 16}), jax.devices()[:1], b)
    loss2, accum, _ = _steps(config.overrides({"data.batch_size": 16, "optim.grad_accum": 2}),
                             jax.devices()[:1], b)
    for x, y in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(accum["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_the_plain_loss_on_eight_devices(one_device):
    """optim.loss_chunk: the same losses and parameters as the whole-sequence loss, sharded
    over data x fsdp x tensor (the vocabulary projection split over tensor)."""
    config, (ref, plain, _) = one_device
    got, state, _ = _steps(config.overrides({"optim.loss_chunk": 5}), jax.devices(),
                           _batches(config, 3), configs.MeshConfig(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_z_loss_adds_palms_term(one_device):
    config, (ref, _, _) = one_device
    got, _, _ = _steps(config.overrides({"optim.z_loss": 1e-2, "optim.steps": 1}),
                       jax.devices()[:1], _batches(config, 1))
    assert got[0] > ref[0]     # lse^2 > 0 at initialisation: the first step's loss grows


def test_loss_options_are_checked():
    with pytest.raises(configs.ConfigError, match="optim.loss_chunk"):
        configs.OptimConfig(loss_chunk=-1)
    with pytest.raises(configs.ConfigError, match="optim.z_loss"):
        configs.OptimConfig(z_loss=-0.5)
    config = tiny("unused", "optim.loss_chunk=4")
    with pytest.raises(configs.ConfigError, match="classifies whole rows"):
        trainer_lib.Trainer(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]),
                            vocab_size=16, num_classes=4)


def test_weight_decay_mask_and_groups():
    config = configs.resolve(preset="smoke", sets=["model.mixer=s4d,s5", "model.num_layers=2",
                                                    "optim.decay_embeddings=false"])
    model = trainer_lib.build_model(config, 16, rngs=__import__("flax").nnx.Rngs(0))
    from flax import nnx
    labels = nnx.to_flat_state(trainer_lib.param_labels(nnx.state(model, nnx.Param),
                                                        config.optim))
    by_path = {"/".join(map(str, p)): v for p, v in labels}
    dynamics = ["log_dt", "log_neg_a_real", "a_imag", "log_step", "log_neg_lambda_real",
                "lambda_imag"]
    for path, label in by_path.items():
        leaf = path.split("/")[-1]
        if leaf in dynamics:
            assert label == "ssm_dynamics/no_decay", path
        elif leaf in ("bias", "scale") or leaf == "embed":
            assert label == "default/no_decay", path
        else:
            assert label == "default", path         # kernels, B, C, D
    assert sum(label == "ssm_dynamics/no_decay" for label in by_path.values()) == 6
    assert by_path["embed"] == "default/no_decay"


def test_learning_rate_group_multiplier(one_device):
    """ssm_dynamics at lr x 0 stay put while everything else moves."""
    config, (_, ref_state, _) = one_device
    config = config.overrides({"optim.lr_multipliers": {"ssm_dynamics": 0.0}})
    _, state, t = _steps(config, jax.devices()[:1], _batches(config, 3))
    init = t.init()
    from flax import nnx
    flat0 = dict(nnx.to_flat_state(init["params"]))
    for path, v in nnx.to_flat_state(state["params"]):
        moved = not np.array_equal(np.asarray(v[...]), np.asarray(flat0[path][...]))
        assert moved == (trainer_lib.param_group(v) == "default"), path


def test_bfloat16_compute_float32_state(tmp_path):
    config = tiny(tmp_path, "model.dtype=bfloat16", "optim.steps=2")
    ls, state, _ = _steps(config, jax.devices(), _batches(config, 2),
                          configs.MeshConfig(data=2, fsdp=2, tensor=2))
    assert all(np.isfinite(ls))
    dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
    dtypes |= {x.dtype for x in jax.tree.leaves(state["opt"]) if x.ndim > 0}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_unknown_logical_axis_is_a_clear_error():
    mesh = mesh_lib.make_mesh(configs.MeshConfig(), jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown logical axis name 'embd' in w.*LOGICAL_AXIS"):
        mesh_lib.logical_to_spec(("embd",), (4,), mesh, where="w")
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        mesh_lib.make_mesh(configs.MeshConfig(data=2, fsdp=2, tensor=2, sequence=2))
    assert dict(mesh_lib.make_mesh(configs.MeshConfig(fsdp=2, data=-1)).shape) == {
        "data": 4, "fsdp": 2, "tensor": 1, "sequence": 1}
    # a dimension the mesh does not divide is replicated rather than rejected
    mesh8 = mesh_lib.make_mesh(configs.MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh_lib.logical_to_spec(("vocab", "embed"), (15, 16), mesh8) == P(None, "fsdp")


def test_scanned_hybrid_on_a_sequence_mesh_equals_one_device(tmp_path):
    """s4d + attention, scan over layers, time split over "sequence": the rules cover every
    logical name the stack uses (heads, kv_heads, kv, layers) and GSPMD keeps the math."""
    config = tiny(tmp_path, "model.mixer=s4d,attention", "model.num_layers=2",
                  "model.scan_layers=true", "model.remat=full", "data.seq_len=32",
                  "optim.steps=2")
    batches = _batches(config, 2)
    ref, _, _ = _steps(config, jax.devices()[:1], batches)
    got, state, _ = _steps(config, jax.devices(), batches,
                           configs.MeshConfig(data=1, fsdp=2, tensor=2, sequence=2))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_sequence_parallel_scans_on_a_sequence_mesh_equal_one_device(tmp_path):
    """S5 and S4D (whose packed documents run its recurrent form) with time split four ways: the
    trainer turns on pallas_kernels.sequence_parallel, the scans run through their shard_map
    path (counted at trace time), documents cross the shard boundaries, and the losses equal
    one device."""
    sp = importlib.import_module("pallas_kernels.sequence_parallel")
    config = tiny(tmp_path, "model.mixer=s5,s4d", "model.num_layers=2", "data.seq_len=32",
                  "optim.steps=2")
    batches = _batches(config, 2)
    rows = config.data.batch_size
    # documents of lengths 5, 11, 16: boundaries inside shards and at one shard's start (16)
    seg = np.repeat(np.array([0, 1, 2], np.int32), [5, 11, 16])[None].repeat(rows, 0)
    batches = [dict(b, segment_ids=seg) for b in batches]
    ref, _, _ = _steps(config, jax.devices()[:1], batches)
    before = sp.sharded_calls("linear_scan")
    got, _, _ = _steps(config, jax.devices(), batches,
                       configs.MeshConfig(data=2, fsdp=1, tensor=1, sequence=4))
    assert sp.sharded_calls("linear_scan") > before
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_dropout_state_advances_through_accumulation(tmp_path):
    """Stateful layers (dropout's RNG count) update inside jit + scan and ride in the state."""
    config = tiny(tmp_path, "optim.grad_accum=2", "optim.steps=2",
                  "model.mixer_options.dropout=0.5")
    batches = _batches(config, 2)
    ls, state, t = _steps(config, jax.devices()[:1], batches)
    counts = [x for x in jax.tree.leaves(state["rest"]) if x.dtype == jnp.uint32 and x.ndim == 0]
    # one draw per dropout call: 2 steps x 2 micro-batches x the calls in one forward
    assert counts and all(int(c) > 0 and int(c) % 4 == 0 for c in counts)
    assert all(np.isfinite(ls))


def test_every_remat_policy_gives_no_remat_gradients_for_ssms_and_attention():
    """Each REMAT_POLICIES entry traces and gives no-remat's gradients of the training loss for a
    stack of S4D (complex Vandermonde/FFT), S5 (complex dots into linear_scan) and attention,
    with packed documents: the dots-saving policies once failed on complex residuals
    (jax.checkpoint's reduce_precision). Model-level: a Trainer per policy costs a minute of CI."""
    from memzoo.models import REMAT_POLICIES, CausalLM
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 17)), jnp.int32)
    segments = jnp.asarray([[0] * 5 + [1] * 11] * 2, jnp.int32)
    grads = {}
    for policy in REMAT_POLICIES:
        model = CausalLM(vocab_size=32, d_model=16, num_layers=3, mixer="s4d,s5,attention",
                         remat=policy, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1], segment_ids=segments)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        grads[policy] = jax.jit(jax.grad(loss))(params)
    ref = jax.tree.leaves(grads["none"])
    for policy, g in grads.items():
        leaves = jax.tree.leaves(g)
        assert len(leaves) == len(ref), policy
        for x, r in zip(leaves, ref):
            x, r = np.asarray(x), np.asarray(r)
            assert np.all(np.isfinite(x)), policy
            assert np.linalg.norm(x - r) <= 1e-5 * max(np.linalg.norm(r), 1e-30), policy
