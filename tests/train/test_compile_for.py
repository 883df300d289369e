"""python -m train --compile_for: the sharded train step compiled for a TPU topology without one.

Needs libtpu (compile-only TPU devices); the Python 3.11 CI stage has none and skips.
"""
import pytest

pytest.importorskip("libtpu")

pytestmark = pytest.mark.compile

import configs  # noqa: E402
from configs.base import ConfigError  # noqa: E402
from train import compile_for  # noqa: E402
from train.__main__ import main, parse_args  # noqa: E402

TARGET = "v5e:2x2"


def small_sets(tmp_path, **sets) -> list[str]:
    """lm350m_attention shrunk to seconds, on a data x fsdp mesh of the 4 chips; data_dir and
    the corpus point where nothing exists, so reading data would fail."""
    return ["model.d_model=256", "model.num_layers=1", "model.scan_layers=false",
            "model.mixer_options.num_heads=2",
            "data.seq_len=256", "data.batch_size=8", "mesh.data=2", "mesh.fsdp=2",
            f"data.data_dir={tmp_path / 'no_data'}",
            f"data.task_options.corpus={tmp_path / 'no_corpus'}",
            *(f"{k}={v}" for k, v in sets.items())]


def small(tmp_path, **sets):
    return configs.resolve(preset="lm350m_attention", sets=small_sets(tmp_path, **sets))


def test_small_model_compiles_with_memory_flops_and_collectives(tmp_path, capsys, monkeypatch):
    reports = []    # the command's own report (one compile serves both halves of the test)
    real = compile_for.compile_for
    monkeypatch.setattr(compile_for, "compile_for",
                        lambda *a, **k: reports.append(real(*a, **k)) or reports[-1])
    argv = ["--preset", "lm350m_attention", "--compile_for", TARGET]
    for item in small_sets(tmp_path):
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for part in ("arguments", "temporaries", "total", "16 GiB HBM", "FLOPs per step",
                 "all-gather", "data=2 x fsdp=2"):
        assert part in out, part

    config, (report,) = small(tmp_path), reports
    assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 1}
    assert (report.device_kind, report.num_devices, report.hbm_bytes) == \
        ("TPU v5 lite", 4, 16 * 2**30)
    # The state is split over fsdp: a device holds about half of the float32 parameters and
    # Adam's two moments (12 bytes a parameter), never the whole.
    state = 12 * report.num_params
    assert 0.4 * state < report.argument_bytes < 0.75 * state, (report.argument_bytes, state)
    assert report.alias_bytes > 0.9 * (report.argument_bytes - 8 * 256 * 16 // 4)  # donated
    assert 0 < report.total_bytes < report.hbm_bytes and report.fits
    # A train step is at least forward + backward of the matmuls: 6 FLOPs per parameter per
    # token, for this device's quarter of the batch (layers unrolled: XLA counts every one).
    tokens = config.data.batch_size * config.data.seq_len / 4
    assert report.model_flops == 6 * report.num_params * tokens
    assert report.flops >= 0.9 * report.model_flops, (report.flops, report.model_flops)
    # fsdp gathers weights; the data axis sums gradients
    assert report.collectives["all-gather"][0] > 0
    assert "all-reduce" in report.collectives or "reduce-scatter" in report.collectives
    assert all(count > 0 and size > 0 for count, size in report.collectives.values())
    assert not (tmp_path / "no_data").exists()      # nothing read, nothing prepared


def test_oversized_config_names_the_overflow(tmp_path, capsys):
    # 2048 x 4096 tokens of activations, no remat, on 4 chips of 16 GiB: the TPU compiler refuses
    # the temporaries (about 19 GiB a chip, CompileTimeHbmOom), and the command says so in the
    # report's words. (Flash attention and the chunked loss keep T^2 scores and [B, T, V] logits
    # out of it: 512 x 4096 tokens fit.)
    argv = ["--preset", "lm350m_attention", "--compile_for", TARGET]
    for item in small_sets(tmp_path, **{"data.batch_size": 2048, "data.seq_len": 4096,
                                         "model.remat": "none"}):
        argv += ["--set", item]
    assert main(argv) == 1
    message = capsys.readouterr().err
    assert f"GiB per device of {TARGET} (TPU v5 lite, 16 GiB HBM)" in message, message
    assert "temporaries" in message and "reduce data.batch_size" in message
    assert float(message.split("needs ")[1].split(" GiB")[0]) > 16
    assert "Traceback" not in message


def test_memory_analysis_overflow_is_named():
    """Targets whose compiler does not refuse (GPUs) are checked against the memory analysis."""
    report = compile_for.CompileReport(
        target="h100x8", device_kind="NVIDIA H100 80GB HBM3", num_devices=8,
        mesh={"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}, num_params=10**9,
        global_batch=64, seq_len=4096, argument_bytes=3 * 2**30, output_bytes=3 * 2**30,
        alias_bytes=3 * 2**30, temp_bytes=90 * 2**30, code_bytes=2**20, hbm_bytes=80 * 2**30,
        flops=1e15, collectives={}, kernels=0, lower_seconds=1.0, compile_seconds=1.0)
    assert not report.fits
    with pytest.raises(compile_for.DoesNotFit, match=r"needs 93\.0 GiB per device of h100x8 "
                       r"\(NVIDIA H100 80GB HBM3, 80 GiB HBM\): temporaries 90\.0 GiB, "
                       r"arguments 3\.0 GiB, outputs 3\.0 GiB"):
        report.check_fits()


def test_mesh_must_cover_the_topology(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.fsdp=4 x mesh.tensor=1 x "
                                          r"mesh.sequence=1 is 8 devices, but v5e:2x2 has 4"):
        compile_for.compile_for(small(tmp_path, **{"mesh.fsdp": 4}), TARGET)
    assert main(["--preset", "smoke", "--set", "mesh.data=3", "--compile_for", TARGET]) == 2
    assert "mesh.data=3" in capsys.readouterr().err


def test_help_lists_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--compile_for" in capsys.readouterr().out
