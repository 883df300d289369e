"""The session's own setup (tests/conftest.py)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eight_devices_even_when_xla_flags_is_already_set():
    """A caller's XLA_FLAGS is kept and the 8 host devices are still added to it."""
    code = ("import os, tests.conftest, jax; "
            "print(len(jax.devices('cpu')), '--xla_cpu_enable_fast_math=false' in os.environ['XLA_FLAGS'])")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false", PYTHONPATH=ROOT,
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", "True"]
