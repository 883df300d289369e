"""The sharded training step: model, optimizer, sharded init, jitted train and eval steps.

Functional style: the model is split once into a graphdef and states, and every jitted function
is pure over a `TrainState` dict {"step", "params", "rest", "opt", "rng"}, so shardings,
donation and checkpoints all see one plain pytree.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import pallas_kernels
from configs.base import ConfigError, OptimConfig, TrainConfig
from memzoo import layers
from memzoo import losses as losses_lib
from memzoo.models import CausalLM, SequenceClassifier
from train import mesh as mesh_lib

# Parameter groups come from the tags each parameter carries from where it was made
# (memzoo.layers.param(..., group=, weight_decay=)), not from its name: a dt bias stored as
# `decay_proj.bias` is as much an SSM time scale as one called `dt_bias`. The group names (and
# configs' optim.lr_multipliers keys) are memzoo.layers.PARAM_GROUPS.
PARAM_GROUPS = tuple(g for g in layers.PARAM_GROUPS if g != "default")
# Within the default group, the layers' conventions: biases and norm scales (and anything under
# a norm) are not decayed.
NO_DECAY_LEAVES = ("bias", "scale")
EMBEDDING_LEAVES = ("embed",)                # decayed unless optim.decay_embeddings is false


def path_names(path) -> tuple[str, ...]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(n for n in names if n != "value")


def param_group(variable) -> str:
    """The group of a parameter (an nnx Variable, or ToLinen's NNXMeta box): its tag."""
    return layers.param_group_of(variable)


def decays(names: tuple[str, ...], variable, config: OptimConfig) -> bool:
    if param_group(variable) != "default" or not layers.weight_decay_of(variable):
        return False
    leaf = names[-1]
    if leaf in NO_DECAY_LEAVES or any("norm" in n for n in names):
        return False
    return config.decay_embeddings or leaf not in EMBEDDING_LEAVES


def param_labels(params, config: OptimConfig):
    """A label per parameter: "<group>" or "<group>/no_decay" (a prefix tree of `params`, an
    nnx State whose leaves are the tagged Variables)."""
    def label(path, variable):
        return param_group(variable) + ("" if decays(path_names(path), variable, config)
                                        else "/no_decay")
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=mesh_lib._is_variable)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW per (group, decay) label with warmup + cosine decay."""
    unknown = set(config.lr_multipliers) - set(layers.PARAM_GROUPS)
    if unknown:
        raise ConfigError(f"config key 'optim.lr_multipliers': unknown group(s) "
                          f"{sorted(unknown)}; groups: default, {', '.join(PARAM_GROUPS)}")
    decay_steps = max(config.steps, config.warmup_steps + 1)

    def adamw(group: str, weight_decay: float):
        peak = config.learning_rate * config.lr_multipliers.get(group, 1.0)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, config.warmup_steps, decay_steps, end_value=peak * config.final_lr_fraction)
        return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=weight_decay)

    transforms = {}
    for group in ("default", *PARAM_GROUPS):
        transforms[group] = adamw(group, config.weight_decay)
        transforms[group + "/no_decay"] = adamw(group, 0.0)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.multi_transform(transforms, lambda p: param_labels(p, config)))


def build_model(config: TrainConfig, vocab_size: int, rngs: nnx.Rngs,
                num_classes: int | None = None) -> nnx.Module:
    """CausalLM for next-token tasks; SequenceClassifier when the task has classes."""
    m = config.model
    kwargs: dict[str, Any] = dict(vocab_size=vocab_size, d_model=m.d_model,
                                  num_layers=m.num_layers, mixer=m.mixer,
                                  mixer_options=dict(m.mixer_options), mlp_ratio=m.mlp_ratio,
                                  scan_layers=m.scan_layers, remat=m.remat,
                                  dtype=jnp.dtype(m.dtype), mlp=m.mlp,
                                  mlp_options=dict(m.mlp_options), mlp_hidden=m.mlp_hidden,
                                  mlp_activation=m.mlp_activation, norm_eps=m.norm_eps,
                                  residual_fp32=m.residual_fp32, embed_scale=m.embed_scale,
                                  mlp_bias=m.mlp_bias,
                                  rngs=rngs)
    if num_classes:
        if m.max_positions:
            raise ConfigError("config key 'model.max_positions': learned positions are for "
                              "next-token tasks (CausalLM); this task has classes")
        if m.logit_softcap is not None:
            raise ConfigError("config key 'model.logit_softcap': a soft cap on vocabulary "
                              "logits is for next-token tasks (CausalLM); this task has classes")
        return SequenceClassifier(num_classes=num_classes, pooling=m.pooling, **kwargs)
    if m.recurrent_memory:
        if num_classes:
            raise ConfigError("config key 'model.recurrent_memory': the recurrent-memory wrapper "
                              "is a language model; this task has classes")
        from memzoo.memories.rmt import RecurrentMemoryLM
        try:
            return RecurrentMemoryLM(logit_softcap=m.logit_softcap, **dict(m.recurrent_memory),
                                     **kwargs)
        except ValueError as e:  # the wrapper names the bad option
            raise ConfigError(f"config key 'model.recurrent_memory': {e}") from None
    return CausalLM(max_positions=m.max_positions, logit_softcap=m.logit_softcap, **kwargs)


def _opt_shardings(abstract_opt, abstract_params, param_shardings, mesh: Mesh):
    """Optimizer-state leaves shaped like a parameter (Adam's mu, nu) take its sharding; the rest
    (counts) are replicated. Matched by the parameter's path as a suffix of the leaf's path."""
    by_path = {}
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(param_shardings)):
        by_path[tuple(map(str, path))] = (leaf.shape, sharding)

    def one(path, leaf):
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return mesh_lib.replicated(mesh)
    return jax.tree_util.tree_map_with_path(one, abstract_opt)


class Trainer:
    """Owns the mesh, the shardings of the train state and the compiled steps."""

    def __init__(self, config: TrainConfig, mesh: Mesh, *, vocab_size: int,
                 num_classes: int | None = None):
        self.config, self.mesh, self.vocab_size = config, mesh, vocab_size
        self.num_classes = num_classes
        if num_classes and config.optim.loss_chunk:
            raise ConfigError(f"config key 'optim.loss_chunk': chunks the time axis of a language "
                              f"model's loss; task {config.data.task!r} classifies whole rows "
                              f"(set it to 0)")
        m = config.model
        if not config.optim.aux_loss_weight and any(
                (o or {}).get("sow_aux_loss") for o in (m.mixer_options, m.mlp_options)):
            # uncaptured, a sow adds a variable to the model mid-step and the state's
            # structure no longer matches the compiled step's
            raise ConfigError("config key 'optim.aux_loss_weight': a layer sows an auxiliary "
                              "loss (sow_aux_loss=True) but the weight is 0; set a weight > 0 "
                              "or sow_aux_loss=false")
        if config.optim.aux_loss_weight and m.scan_layers:
            # nnx.capture of a sow inside nnx.scan fails in lax.scan (flax 0.12.8)
            raise ConfigError("config key 'optim.aux_loss_weight': auxiliary losses are captured "
                              "only from a Python layer loop; set model.scan_layers=false")
        self.tx = make_optimizer(config.optim)
        seed = config.seed

        def init() -> dict:
            model = build_model(config, vocab_size, nnx.Rngs(seed), num_classes)
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
                    "opt": self.tx.init(params), "rng": jax.random.PRNGKey(seed + 1)}

        abstract_model = nnx.eval_shape(lambda: build_model(config, vocab_size, nnx.Rngs(seed), num_classes))
        self.graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
        # Documents the fitted retrievers want before the first step (MemoryBank's
        # retrieval='tokens': the paper clusters its corpus before pretraining); 0: none.
        self.retriever_documents = max((m.fit_documents for _, m in nnx.iter_modules(
            abstract_model) if getattr(m, "reads_tokens", False)), default=0)
        abstract = jax.eval_shape(init)
        repl = mesh_lib.replicated(mesh)
        param_sh = mesh_lib.state_shardings(abs_params, mesh)
        self.shardings = {
            "step": repl, "params": param_sh, "rest": mesh_lib.state_shardings(abs_rest, mesh),
            "opt": _opt_shardings(abstract["opt"], abstract["params"], param_sh, mesh),
            "rng": repl}
        # Abstract arrays carrying their target shardings: what a checkpoint restores onto.
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            self.shardings)
        self._init = jax.jit(init, out_shardings=self.shardings)
        self._train = self._eval = None
        self.flops_per_step: float | None = None

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state["params"]))

    def init(self) -> dict:
        return self._init()

    # -- fitted retrievers ----------------------------------------------------------------------
    def fit_retrievers(self, state: dict, tokens, segment_ids=None) -> tuple[dict, list[dict]]:
        """(state with every fitted retriever fitted on the documents tokens [n, t] (one per
        row, or per segment), each retriever's fit summary). On the host; every process must
        pass the same documents, so that all fit the same retriever."""
        model = nnx.merge(self.graphdef, state["params"], jax.device_get(state["rest"]))
        fits = [m.fit(tokens, segment_ids=segment_ids) for _, m in nnx.iter_modules(model)
                if getattr(m, "reads_tokens", False)]
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return dict(state, rest=jax.device_put(rest, self.shardings["rest"])), fits

    # -- batches ------------------------------------------------------------------------------
    def batch_shardings(self, batch: dict) -> dict:
        return {k: mesh_lib.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def shard_batch(self, local_batch: dict) -> dict:
        """Each process's rows -> one global array per key, split over ("data", "fsdp")."""
        shardings = self.batch_shardings(local_batch)
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
                for k, v in local_batch.items()}

    # -- steps ---------------------------------------------------------------------------------
    def _sequence_parallel(self):
        """With time split over "sequence", the state-carrying ops (the SSM scans, linear
        attention) run sequence-parallel: each device scans its slice of time and the slices'
        states are combined (pallas_kernels/sequence_parallel.py), rather than GSPMD gathering
        the time axis for a sequential scan."""
        if self.mesh.shape.get("sequence", 1) > 1:
            return pallas_kernels.sequence_parallel("sequence", mesh=self.mesh)
        return contextlib.nullcontext()

    def _constrain(self, x, names):
        spec = mesh_lib.logical_to_spec(names, x.shape, self.mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _loss_sums(self, model, batch, *, with_aux: bool = False):
        """Sums (not means) over the mask, so micro-batches add up to exactly the full batch.
        With optim.aux_loss_weight > 0 the layers' sown "aux_loss" values are captured, and
        `with_aux` (the train loss) adds weight * their sum per token, so the mean train loss
        is the model's + weight * aux; held-out losses stay the model's alone."""
        weight = self.config.optim.aux_loss_weight
        with self._sequence_parallel(), layers.activation_sharding(self._constrain):
            if not weight:
                return self._loss_sums_inner(model, batch)
            (loss_sum, (correct, count)), aux = nnx.capture(
                self._loss_sums_inner, nnx.Intermediate)(model, batch)
        if with_aux:
            total = sum(jnp.sum(v) for v in jax.tree.leaves(aux))
            loss_sum = loss_sum + weight * total * count
        return loss_sum, (correct, count)

    def _loss_sums_inner(self, model, batch):
        segments = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
        optim = self.config.optim
        if self.num_classes:
            # one example per row: the mask says which positions the pooling reads
            logits = model(batch["inputs"], mask=batch.get("mask"), **segments)
            targets = batch["label"]
            mask = jnp.ones(targets.shape, jnp.float32)
            loss_sum, correct = losses_lib.logit_sums(logits, targets, mask, optim.z_loss)
        else:
            targets = batch["targets"]
            mask = batch.get("mask", jnp.ones(targets.shape, jnp.float32)).astype(jnp.float32)
            loss_sum, correct = losses_lib.cross_entropy_sums(
                model.features(batch["inputs"], **segments), model.project, targets, mask,
                chunk_size=optim.loss_chunk, z_loss=optim.z_loss)
        return loss_sum, (correct, mask.sum())

    def _grads(self, params, rest, batch):
        """Merged at the current trace level and differentiated with nnx.value_and_grad, so
        stateful layers (dropout's RNG counts) may update `rest` inside jit and scan."""
        model = nnx.merge(self.graphdef, params, rest)
        (loss_sum, (correct, count)), grads = nnx.value_and_grad(
            functools.partial(self._loss_sums, with_aux=True),
            argnums=nnx.DiffState(0, nnx.Param), has_aux=True)(model, batch)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return loss_sum, correct, count, rest, grads

    def _train_step(self, state: dict, batch: dict):
        k = self.config.optim.grad_accum
        params = state["params"]
        if k == 1:
            loss_sum, correct, count, rest, grads = self._grads(params, state["rest"], batch)
        else:
            # Micro-batch j takes rows j, j+k, j+2k...: each keeps the batch's even split
            # over devices, so no data moves between micro-batches.
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)

            def body(carry, mb):
                # params ride in the carry: nnx.merge refuses values from an outer trace
                params, grads, loss_sum, correct, count, rest = carry
                l, c, n, rest, g = self._grads(params, rest, mb)
                return (params, jax.tree.map(jnp.add, grads, g), loss_sum + l, correct + c,
                        count + n, rest), None
            zero = jnp.zeros((), jnp.float32)
            init = (params, jax.tree.map(jnp.zeros_like, params), zero, zero, zero,
                    state["rest"])
            (_, grads, loss_sum, correct, count, rest), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt = self.tx.update(grads, state["opt"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "rest": rest, "opt": opt, "rng": jax.random.split(state["rng"])[0]}
        metrics = {"loss": loss_sum / denom, "accuracy": correct / denom, "tokens": count,
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    def _eval_step(self, state: dict, batch: dict):
        model = nnx.merge(self.graphdef, state["params"], state["rest"])
        model.eval()  # dropout off; the updated RNG counts are thrown away
        loss_sum, (correct, count) = self._loss_sums(model, batch)
        return {"loss_sum": loss_sum, "correct": correct, "count": count}

    def token_outputs(self, state: dict, batch: dict):
        """(cross-entropy [B, T] float32 without z-loss, argmax [B, T] int32) of a next-token
        batch, the model in eval mode: what train/eval.py reduces. Traceable; jit it with
        `jit_eval` so it runs sharded as the steps do."""
        if self.num_classes:
            raise ConfigError(f"task {self.config.data.task!r} classifies whole sequences: "
                              "per-token losses need a next-token task")
        model = nnx.merge(self.graphdef, state["params"], state["rest"])
        model.eval()
        segments = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
        with self._sequence_parallel(), layers.activation_sharding(self._constrain):
            return losses_lib.cross_entropy_per_token(
                model.features(batch["inputs"], **segments), model.project, batch["targets"],
                chunk_size=self.config.optim.loss_chunk)

    def jit_eval(self, fn, batch: dict, num_extra: int = 0):
        """`fn(state, batch, *extra)` jitted on the mesh: the state as trained, the batch split
        as `shard_batch` splits it, `num_extra` further arguments and every output replicated.
        Call the result inside `jax.set_mesh(self.mesh)`."""
        repl = mesh_lib.replicated(self.mesh)
        return jax.jit(fn, in_shardings=(self.shardings, self.batch_shardings(batch),
                                         *([repl] * num_extra)), out_shardings=repl)

    def jitted_steps(self, batch: dict):
        """(train, eval) jitted with this batch structure's shardings, not yet lowered; public so
        the benchmarks can time lowering and compiling of the very step the loop runs."""
        batch_sh = self.batch_shardings(batch)
        repl = mesh_lib.replicated(self.mesh)
        train = jax.jit(self._train_step, in_shardings=(self.shardings, batch_sh),
                        out_shardings=(self.shardings, repl), donate_argnums=0)
        evaluate = jax.jit(self._eval_step, in_shardings=(self.shardings, batch_sh),
                           out_shardings=repl)
        return train, evaluate

    def compile(self, state: dict, batch: dict) -> None:
        """Lower and compile both steps for this batch structure; record FLOPs per step."""
        train, evaluate = self.jitted_steps(batch)
        with jax.set_mesh(self.mesh):
            self._train = train.lower(state, batch).compile()
            self._eval = evaluate.lower(state, batch).compile()
        self.flops_per_step = flops_of(self._train)

    def train_step(self, state: dict, batch: dict):
        if self._train is None:
            self.compile(state, batch)
        return self._train(state, batch)

    def eval_step(self, state: dict, batch: dict):
        if self._eval is None:
            self.compile(state, batch)
        return self._eval(state, batch)


def flops_of(compiled) -> float | None:
    """XLA's FLOP count for one call of a compiled function (per device under SPMD)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends have no cost model
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
