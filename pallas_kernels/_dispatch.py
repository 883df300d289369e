"""Choosing an implementation of an op: `implementation="auto" | "pallas" | "xla" | "reference"`.

Every public op takes `implementation=` and hands its array arguments to `dispatch`, with one
callable per implementation. The choice for "auto" is made with `jax.lax.platform_dependent`, at
lowering time, not by asking `jax.devices()` while tracing: a function traced once and exported
with `jax.export(..., platforms=("cpu", "tpu", "cuda"))` then carries the right implementation for
each platform, and lowering for "tpu" or "cuda" on a CPU-only machine picks the Pallas kernel.

    platform | "auto"                | "pallas"
    ---------+-----------------------+------------------------------------------
    tpu      | Pallas, Mosaic TPU    | Pallas, Mosaic TPU
    cuda     | Pallas, Triton        | Pallas, Triton
    other    | XLA path              | Pallas (GPU variant), generic interpret mode (slow)

`pallas_interpret(...)` is the test hook: inside it "auto" and "pallas" both run the Pallas
kernels in the given interpret mode on whatever backend is present, so a whole model can be run
through its kernels on a CPU. The mode is read when a function is traced; jit caches do not see
it, so build fresh jitted functions inside the context (tests do).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from typing import Any, Callable, Literal

import jax

IMPLEMENTATIONS = ("auto", "pallas", "xla", "reference")

Implementation = Literal["auto", "pallas", "xla", "reference"]

# The kernel variants a Pallas module provides, by the hardware they are written for. Either can
# also run through an interpreter on any backend (see `pallas_interpret`).
PALLAS_TARGETS = ("tpu", "cuda")

_interpret_mode: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "memzoo_pallas_interpret", default=None)


def tpu_interpret_params():
    """TPU interpret mode as the contract asks: race detection on, uninitialised memory NaN."""
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")


@contextlib.contextmanager
def pallas_interpret(mode: Literal["generic", "tpu"] = "generic",
                     target: Literal["tpu", "cuda"] | None = None):
    """Runs every memzoo Pallas kernel traced inside in interpret mode.

    mode="generic": Pallas' generic interpreter (any backend; uninitialised outputs read as NaN).
    mode="tpu": Pallas' TPU interpreter with `detect_races=True, uninitialized_memory="nan"`, which
    also models TPU semantics (grid order, scratch persistence, DMA races).
    target: which kernel variant to interpret, the TPU one or the GPU (Triton) one; by default
    "tpu" for mode="tpu" and "cuda" for mode="generic".
    """
    if mode == "generic":
        value: Any = True
    elif mode == "tpu":
        value = tpu_interpret_params()
    else:
        raise ValueError(f"pallas_interpret: mode must be 'generic' or 'tpu', got {mode!r}")
    target = target or ("tpu" if mode == "tpu" else "cuda")
    if target not in PALLAS_TARGETS:
        raise ValueError(f"pallas_interpret: target must be one of {PALLAS_TARGETS}, got {target!r}")
    if mode == "tpu" and target != "tpu":
        raise ValueError("pallas_interpret: TPU interpret mode runs only the 'tpu' kernels")
    token = _interpret_mode.set((value, target))
    try:
        yield
    finally:
        _interpret_mode.reset(token)


def current_interpret():
    """None outside `pallas_interpret`; else (`interpret=` value for `pl.pallas_call`, target)."""
    return _interpret_mode.get()


# Set by `pallas_kernels.sequence_parallel(...)`; read when an op is traced.
_sequence_parallel: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "memzoo_sequence_parallel", default=None)


def set_sequence_parallel(setting):
    return _sequence_parallel.set(setting)


def reset_sequence_parallel(token) -> None:
    _sequence_parallel.reset(token)


def sequence_parallel_op(op: str):
    """Decorates a state-carrying public op: inside `pallas_kernels.sequence_parallel(axis)` and
    under a mesh that splits that axis, the op runs with time split over it
    (pallas_kernels/sequence_parallel.py); otherwise it is called as is. `__wrapped__` is the
    undecorated op."""
    def wrap(fn):
        @functools.wraps(fn)
        def public(*args, **kwargs):
            setting = _sequence_parallel.get()
            if setting is not None:
                # imported here: sequence_parallel imports the ops, which import this module
                sp = importlib.import_module("pallas_kernels.sequence_parallel")
                out = sp.run(op, fn, setting, args, kwargs)
                if out is not NotImplemented:
                    return out
            return fn(*args, **kwargs)
        return public
    return wrap


def check_implementation(implementation: str, op: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def dispatch(
    op: str,
    implementation: str,
    *args,
    reference: Callable[..., Any],
    xla: Callable[..., Any],
    pallas: Callable[..., Any] | None,
):
    """Calls the implementation of `op` chosen by `implementation` on `args` (arrays only).

    `pallas(*args, target=..., interpret=...)` is called with target in PALLAS_TARGETS and
    interpret None (compile for that target) or an interpreter setting; the other callables take
    `*args`. All branches must return the same pytree of shapes and dtypes
    (platform_dependent requires it, and it is what makes them interchangeable).
    """
    check_implementation(implementation, op)
    if implementation == "reference":
        return reference(*args)
    if implementation == "xla" or (pallas is None and implementation == "auto"):
        return xla(*args)
    if pallas is None:
        raise ValueError(f"{op}: implementation='pallas' is not available for this op")

    interpreting = current_interpret()
    if interpreting is not None:
        interpret, target = interpreting
        return pallas(*args, target=target, interpret=interpret)

    def on(target, interpret=None):
        return lambda *a: pallas(*a, target=target, interpret=interpret)

    default = on("cuda", True) if implementation == "pallas" else xla
    return jax.lax.platform_dependent(*args, tpu=on("tpu"), cuda=on("cuda"), default=default)
