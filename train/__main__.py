"""python -m train [--preset NAME] [--field value ...]: train and evaluate, printing progress."""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import TrainConfig, from_args
from memzoo.models import CausalLM
from train.tasks import delayed_recall


def build(config: TrainConfig):
    mixer_options = {"state_size": config.state_size}
    model = CausalLM(vocab_size=config.vocab_size, d_model=config.d_model,
                     num_layers=config.num_layers, mixer=config.mixer,
                     mixer_options=mixer_options, rngs=nnx.Rngs(config.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, weight_decay=config.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, optimizer


def loss_and_accuracy(model, tokens, targets, mask):
    logits = model(tokens)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(mask.sum(), 1.0)
    accuracy = ((logits.argmax(-1) == targets) * mask).sum() / denom
    return (losses * mask).sum() / denom, accuracy


@nnx.jit
def train_step(model, optimizer, tokens, targets, mask):
    (loss, accuracy), grads = nnx.value_and_grad(loss_and_accuracy, has_aux=True)(
        model, tokens, targets, mask)
    optimizer.update(model, grads)
    return loss, accuracy


@nnx.jit
def eval_step(model, tokens, targets, mask):
    return loss_and_accuracy(model, tokens, targets, mask)


def batches(config: TrainConfig, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield delayed_recall(rng, config.batch_size, config.seq_len, config.vocab_size,
                             config.delay)


def evaluate(model, config: TrainConfig):
    stream = batches(config, seed=config.seed + 10_000)  # held-out stream, never trained on
    results = [eval_step(model, *map(jnp.asarray, next(stream)))
               for _ in range(config.eval_batches)]
    return tuple(float(np.mean([r[i] for r in results])) for i in range(2))


def run(config: TrainConfig, *, out=sys.stdout) -> dict[str, float]:
    print(f"memzoo train: {config}", file=out)
    print(f"devices: {jax.devices()}", file=out)
    model, optimizer = build(config)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {config.num_layers} x {config.mixer}, {n_params:,} parameters; "
          f"chance accuracy {1 / config.vocab_size:.3f}", file=out)
    first_loss, _ = evaluate(model, config)
    stream = batches(config, seed=config.seed)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        loss, accuracy = train_step(model, optimizer, *map(jnp.asarray, next(stream)))
        if step % config.log_every == 0 or step == config.steps:
            loss, accuracy = float(loss), float(accuracy)
            elapsed = time.perf_counter() - start
            tokens_per_s = step * config.batch_size * config.seq_len / elapsed
            print(f"step {step:5d}/{config.steps}  loss {loss:.4f}  acc {accuracy:.3f}  "
                  f"{tokens_per_s:,.0f} tok/s", file=out, flush=True)
    eval_loss, eval_acc = evaluate(model, config)
    print(f"eval: loss {first_loss:.4f} -> {eval_loss:.4f}, accuracy {eval_acc:.3f} "
          f"(held-out batches)", file=out)
    return {"initial_eval_loss": first_loss, "eval_loss": eval_loss, "eval_accuracy": eval_acc}


def main(argv=None):
    run(from_args(argv))


if __name__ == "__main__":
    main()
