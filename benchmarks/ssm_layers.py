"""S4D and S5 layer entries: forward and forward+backward through `memzoo.MIXERS`.

No peer: the row reports ms and tokens/s. Written against the registry API only
(`MIXERS[name](d_model, *, rngs, **options)`, a module mapping [batch, time, d_model] to the
same), so a layer that has not landed yet, or fails, gives a row with a note, not a crash.
"""
from __future__ import annotations

import inspect
import traceback

import jax
import jax.numpy as jnp

from benchmarks import _timing
from benchmarks.harness import Context, Row

LAYERS = ("s4d", "s5")
# (batch, time, d_model, state size)
FULL_SHAPE = (8, 1024, 256, 64)
QUICK_SHAPE = (2, 64, 32, 8)
# Option names a constructor may use for the state size, most likely first.
STATE_OPTIONS = ("d_state", "state_size", "n_state", "state_dim", "d_state_per_channel", "n")


def _registry():
    try:
        import memzoo
    except Exception as e:  # noqa: BLE001 - memzoo is being built by others; report, go on
        return None, f"import memzoo failed: {type(e).__name__}: {e}"
    mixers = getattr(memzoo, "MIXERS", None)
    if mixers is None:
        return None, "memzoo.MIXERS does not exist yet"
    return mixers, ""


def _state_options(ctor, state: int):
    """Keyword choices for the state size to try in order, each with a note for the row.

    A constructor that forwards **options (a block around a core) does not name the keyword in
    its signature, so each known name is tried; a TypeError from construction rules one out.
    """
    try:
        # nnx.Module's metaclass hides a class's __init__ signature from inspect.signature(cls).
        params = inspect.signature(ctor.__init__ if inspect.isclass(ctor) else ctor).parameters
    except (TypeError, ValueError):
        params = {}
    for name in STATE_OPTIONS:
        if name in params:
            return [({name: state}, "")]
    tries = []
    if not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        tries = [({name: state}, "") for name in STATE_OPTIONS]
    return tries + [({}, "state size: no known option name, default used")]


def _build(ctor, d_model, state):
    from flax import nnx

    for options, note in _state_options(ctor, state):
        try:
            return ctor(d_model, rngs=nnx.Rngs(0), **options), options, note
        except TypeError:
            if not options:
                raise
    raise AssertionError("unreachable: the last choice re-raises")


def _measure(ctx: Context, model, shape):
    from flax import nnx

    batch, length, d_model, _ = shape
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(2), (batch, length, d_model), jnp.float32)

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    fwd = jax.jit(forward)
    out = fwd(params, x)
    if out.shape != x.shape:
        raise ValueError(f"layer output {out.shape}, expected {x.shape}")
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x)), argnums=(0, 1)))
    times = {}
    for mode, fn in (("fwd", fwd), ("fwd+bwd", grad)):
        times[mode] = ctx.time(_timing.fresh_step(fn, params, x)), ctx.last_note
    return times


def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
    batch, length, d_model, state = shape
    shape_s = f"B{batch} T{length} d{d_model} N{state}"
    mixers, why = _registry()
    rows = []
    for name in LAYERS:
        def row(mode, ms, note=""):
            rows.append(Row(f"layer {name}", shape_s, "float32", f"MIXERS[{name!r}]", mode, ms,
                            tokens=batch * length, note=note))

        if mixers is None or name not in mixers:
            note = f"skipped: {why or f'MIXERS has no {name!r} yet'} (memzoo/ssm not landed)"
            ctx.log(f"  layer {name}: {note}")
            row("fwd", None, note)
            continue
        try:
            model, options, note = _build(mixers[name], d_model, state)
            ctx.log(f"  layer {name} {options}")
            times = _measure(ctx, model, shape)
        except Exception as e:  # noqa: BLE001 - one failing layer should not hide the others
            ctx.log(traceback.format_exc())
            row("fwd", None, f"failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        for mode, (ms, budget_note) in times.items():
            row(mode, ms, "; ".join(n for n in (note, budget_note) if n))
    return rows
