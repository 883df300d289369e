"""benchmarks/gpu.py on a CPU: every program of a case lowers to the Pallas backend it is timed
as (the device script's `--dry-run`), and the RESULTS table's ratios come from the right rows."""
from __future__ import annotations

import os

import pytest

from benchmarks import gpu
from pallas_kernels import _aot, _dispatch


def test_table_ratios_and_kernels():
    ours = dict(mosaic={"fwd_ms": 1.0, "fwdbwd_ms": 3.0, "kernels_fwd": ["mosaic_gpu"],
                        "kernels_fwdbwd": ["mosaic_gpu", "triton"]},
                triton={"fwd_ms": 4.0, "fwdbwd_ms": 6.0}, xla={"fwd_ms": 2.0, "fwdbwd_ms": 5.0})
    rows = [{"case": "gla", "phase": "time", "shape": "d64", **ours},
            {"case": "gla", "phase": "peer", "shape": "d64",
             "fla": {"fwd_ms": 2.0, "fwdbwd_ms": 12.0}},
            {"case": "gla", "phase": "check",
             "check": {"mosaic": {"float32": 1e-6, "bfloat16": 2e-3,
                                  "kernels_float32": ["mosaic_gpu"],
                                  "kernels_bfloat16": ["mosaic_gpu"]},
                       "triton": {"float32": 3e-6, "bfloat16": "RuntimeError: x"}}}]
    text = gpu.table(rows)
    timing = next(line for line in text.splitlines() if line.startswith("| gla | d64"))
    cells = [c.strip() for c in timing.split("|")[1:-1]]
    assert cells[2:] == ["1 / 3", "M / M-T", "4 / 6", "2 / 5", "2 / 12", "0.50, 0.25",
                         "0.25, 0.50"]
    check = [line for line in text.splitlines() if line.startswith("| gla |")][-1]
    assert "1e-06 / 0.002" in check and "RuntimeError: x" in check


@pytest.mark.compile
@pytest.mark.parametrize("case", ["gated_delta_rule", "linear_scan"])
def test_dry_run_lowers_each_backend_to_its_kernels(case, monkeypatch):
    """Each program is traced inside its own gpu_backend: the "mosaic" ones hold Mosaic GPU
    kernels (linear_scan's backward is Triton's), the "triton" ones only Triton, XLA none."""
    if os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu"):
        pytest.skip("compile-only devices are tested on a CPU host (JAX_PLATFORMS=cpu)")
    if not (_aot.available("h100") and _dispatch.mosaic_gpu_available()):
        pytest.skip("needs the CUDA plugin and a JAX with Mosaic GPU")
    monkeypatch.setattr(gpu, "SHAPES", {"s": dict(B=1, T=128, H=2, D=64)})
    monkeypatch.setattr(gpu, "SMALL", dict(B=1, T=72, H=2, D=64))
    kinds = gpu.dry_run(case, "h100", ["s"])
    assert set(kinds) == {f"check/{i}/{d}" for i in ("mosaic", "triton")
                          for d in ("float32", "bfloat16")} | \
        {f"s/{i}/{m}" for i in ("mosaic", "triton", "xla") for m in ("fwd", "fwdbwd")}
    backward = "mosaic_gpu" if case == "gated_delta_rule" else "triton"
    for key, k in kinds.items():
        impl, mode = key.split("/")[1:]
        if impl == "xla":
            assert k == []
        elif impl == "triton":
            assert k and set(k) == {"triton"}, (key, k)
        elif mode == "fwd":
            assert k == ["mosaic_gpu"], (key, k)
        else:
            assert k == ["mosaic_gpu", backward], (key, k)
