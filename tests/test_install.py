"""The install split: importing memzoo (and running a mixer) needs only the core dependencies
(jax, flax, numpy, scipy); the training stack is the [train] extra and is never imported."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STACK = ("orbax", "tensorflow_datasets", "grain", "tensorboardX", "train")

PROBE = """
import sys
import jax.numpy as jnp
from flax import nnx
import memzoo, pallas_kernels
layer = memzoo.MIXERS["gated_deltanet"](16, num_heads=2, rngs=nnx.Rngs(0))
layer(jnp.ones((1, 8, 16))).block_until_ready()
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_a_mixer_imports_no_training_stack():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=True).stdout.split()
    assert "memzoo" in out and "jax" in out
    assert not set(TRAIN_STACK) & set(out), sorted(set(TRAIN_STACK) & set(out))


def test_extras_split_core_from_training():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("[")[0] for d in project["dependencies"]}
    assert core == {"jax", "flax", "numpy", "scipy"}
    extras = project["optional-dependencies"]
    assert {"train", "tpu", "cuda12", "test"} <= set(extras)
    assert "memzoo[train]" in extras["test"]
    assert extras["tpu"] == ["jax[tpu]>=0.10"] and extras["cuda12"] == ["jax[cuda12]>=0.10"]
