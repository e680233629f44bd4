"""The benchmark code at tiny sizes: shapes, rows, files and plots (never speed itself)."""

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from zigzag_mamba.bench import cli, contenders, headline, sweep, timing

CPU = torch.device("cpu")


def tiny_settings(**changes) -> sweep.Settings:
    settings = sweep.Settings(
        dim=16,
        backbone_dim=16,
        lengths=[16, 64],
        images=[32],
        min_time_s=0.0,
        min_repeats=1,
        backbone_repeats=1,
        max_repeats=1,
        isolate=False,
    )
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


@pytest.mark.parametrize("name", contenders.default_names(contenders.BLOCKS))
def test_block_workloads_keep_the_token_shape(name):
    workload = contenders.block_workload(name, 16, 64, 2, CPU, torch.float32)
    assert workload.fn(*workload.inputs).shape == (2, 64, 16)
    workload.forward_backward()
    assert all(p.grad is not None for p in workload.module.parameters() if p.requires_grad)


def test_optional_contenders_run_only_when_named():
    assert "zigma-mamba-ssm" in contenders.BLOCKS
    assert "zigma-mamba-ssm" not in sweep.Settings().blocks
    assert sweep.Settings().backbones == ["zigma", "dit"]


@pytest.mark.parametrize("name", list(contenders.BACKBONES))
def test_backbone_workloads_return_latents(name):
    workload = contenders.backbone_workload(name, 16, 32, 2, CPU, torch.float32)
    assert workload.fn(*workload.inputs).shape == (2, 4, 4, 4)
    assert contenders.backbone_tokens(256) == 256 and contenders.backbone_tokens(1024) == 4096


def test_dit_block_is_a_residual_update_gated_by_adaln():
    block = contenders.DiTBlock(16, heads=2)
    x = torch.randn(1, 8, 16)
    assert torch.equal(block(x, torch.randn(1, 16)), x)  # adaLN-Zero: gates start at 0
    contenders.randomize_modulation(block)
    assert not torch.equal(block(x, torch.randn(1, 16)), x)


def test_grids_hold_every_token():
    for length in (16, 512, 4096, 8192):
        height, width = contenders.grid_for(length)
        assert height * width == length and height <= width


def test_time_call_repeats_and_batches_fast_calls():
    result = timing.time_call(lambda: None, CPU, min_repeats=4, min_time_s=0.0)
    assert len(result.samples) == 4 and result.inner > 1
    assert result.low <= result.median <= result.high and result.spread >= 0


def test_peak_memory_sees_a_large_temporary():
    size = 64 * timing.MIB
    peak = timing.peak_memory(lambda: torch.ones(size // 4), CPU)
    assert peak >= 0.9 * size


def test_machine_info_names_the_machine_and_backends():
    info = timing.machine_info(CPU, torch.float32)
    assert info["machine"].startswith(f"cpu-{info['cores']}core-")
    assert "selective_scan" in info["backends"] and info["torch"] == torch.__version__
    assert timing.slug("Intel(R) Xeon(R) CPU @ 2.2GHz") == "intel-xeon-cpu-2-2ghz"


def test_crossover_is_interpolated_log_log():
    theirs = {256: 1.0, 1024: 4.0, 4096: 16.0}
    ours = {256: 4.0, 1024: 4.0, 4096: 4.0}
    assert headline.crossover(ours, theirs) == {"tokens": 1024, "bound": "interpolated"}
    ours = {1024: 8.0, 4096: 8.0}  # ratios 2 and 1/2 meet halfway, in log L
    assert headline.crossover(ours, theirs) == {"tokens": 2048, "bound": "interpolated"}
    assert headline.crossover({256: 0.5}, {256: 1.0})["bound"] == "at or below"
    assert headline.crossover({256: 2.0}, {256: 1.0})["bound"] == "above"


def test_slow_contenders_are_skipped_at_larger_sizes():
    times = {16: 0.3, 64: 4.8, 256: 1.0}  # s; quadratic growth predicts 76.8 s at 256

    def fake_measure(spec):
        return [
            {**sweep._base_row(spec, m, 0), "median_ms": times[spec["size"]] * 1e3, "spread_pct": 0}
            for m in spec["modes"]
        ]

    settings = tiny_settings(max_call_s=10.0)
    rows = sweep._sweep_contender(
        settings, "blocks", "dit", [16, 64, 256], ["fwd"], lambda line: None, fake_measure
    )
    assert [(r["size"], r["status"]) for r in rows] == [(16, "ok"), (64, "ok"), (256, "skipped")]
    times[64] = 2.0  # a slow point far below the limit is noise, not a reason to stop
    rows = sweep._sweep_contender(
        settings, "blocks", "dit", [16, 64, 256], ["fwd"], lambda line: None, fake_measure
    )
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]


def test_a_point_in_a_fresh_process():
    spec = sweep._spec(tiny_settings(), "blocks", "zigma", 16, ["fwd"])
    (row,) = sweep.run_isolated(spec, timeout_s=120)
    assert row["status"] == "ok" and row["tokens"] == 16 and row["peak_mib"] >= 0


def test_cli_writes_every_output(tmp_path, capsys):
    argv = [
        "--device", "cpu", "--suites", "blocks", "ops", "--blocks", "zigma", "dit",
        "--lengths", "16", "--dim", "16", "--min-time", "0",
        "--min-repeats", "1", "--no-isolate", "--out", str(tmp_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (out_dir,) = tmp_path.iterdir()
    names = {p.name for p in out_dir.iterdir()}
    expected = {"blocks.csv", "ops.csv", "results.json", "summary.md"}
    assert expected | {"blocks_time.png", "blocks_memory.png", "ops_time.png"} <= names
    with open(out_dir / "blocks.csv") as handle:
        blocks = list(csv.DictReader(handle))
    assert len(blocks) == 2 * 2  # contenders x modes
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in blocks)
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results) == {"meta", "settings", "summary", "rows"}
    assert results["meta"]["backends"]["selective_scan"]["cpu"]
    ops = {(r["name"], r["backend"]) for r in results["rows"] if r["suite"] == "ops"}
    assert {("permute_tokens", "torch"), ("selective_scan", "reference"), ("sdpa", "torch")} <= ops
    assert (out_dir / "blocks_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Headline" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("mode", "suffix", "label"),
    [("default", "-compiled", "(compiled)"),
     ("reduce-overhead", "-compiled-reduce-overhead", "(compiled, reduce-overhead)")],
)  # fmt: skip
def test_compile_modes_reach_torch_compile_and_name_their_rows(monkeypatch, mode, suffix, label):
    calls = []

    def fake_compile(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--device", "cpu", "--compile", "--compile-mode", mode, "--blocks", "dit"]
    settings = cli.settings_from(parser.parse_args(argv))
    assert settings.compile and settings.compile_mode == mode
    spec = sweep._spec(tiny_settings(), "blocks", "dit", 16, ["fwd", "fwd+bwd"], compile=mode)
    rows = sweep.run_point(spec)
    assert calls == [{"mode": None if mode == "default" else mode, "dynamic": False}]
    assert all(r["name"] == "dit" + suffix and r["label"].endswith(label) for r in rows)
    assert all(r["status"] == "ok" and r["peak_mib"] is not None for r in rows)  # no graphs on CPU
    workload = contenders.block_workload("dit", 16, 16, 1, CPU, torch.float32, compile=mode)
    assert workload.cudagraphs == (mode == "reduce-overhead")


def test_bench_is_a_zigma_command_and_not_imported_by_the_package():
    assert "bench" in cli_commands()
    code = "import sys, zigzag_mamba; print('zigzag_mamba.bench' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False"


def cli_commands() -> list[str]:
    from zigzag_mamba.cli import build_parser

    parser = build_parser()
    return list(parser._subparsers._group_actions[0].choices)


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "bench_order_cost.py",
            ["--lengths", "64", "--dim", "16", "--repeats", "3"],
            ["| 64 | fwd |", "| 64 | fwd+bwd |"],
        ),
        (
            "bench_strategies.py",
            ["--lengths", "64", "--dim", "16", "--repeats", "2"],
            ["| 64 | fwd+bwd | cross |", "| 64 | fwd | bidirectional |", "| 64 | "],
        ),
        (
            "bench_selective_scan.py",
            ["--quick"],
            ["| numba vs torch | 1024 |", "| torch vs materialised loop | 256 |"],
        ),
        (
            "bench_threads.py",
            ["--quick", "--loads", "1"],
            ["| 1 thread | 1 | ", "| default, OMP_WAIT_POLICY=passive | ", "| 1 busy process |"],
        ),
        (
            "bench_recompute.py",
            [
                "--lengths",
                "64",
                "--dim",
                "16",
                "--repeats",
                "2",
                "--threads",
                "1",
                "--images",
                "32",
                "--backbone-dim",
                "16",
            ],
            ["| 64 | fwd |", "| 64 | fwd+bwd |", "| 32 | 4 |"],
        ),
        (
            "bench_train_step.py",
            ["--device", "cpu", "--tiny"],
            ["| ZigMa-B/2 | 2 |", "| DiT-B/2 | 2 |", "ZigMa-B/2 / DiT-B/2: step time"],
        ),
    ],
)
def test_benchmark_scripts_print_their_tables(tmp_path, script, args, expected):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert all(row in done.stdout for row in expected), done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the real GPU check on a GPU")
def test_gpu_check_always_writes_its_summary(tmp_path):
    # Without a GPU every section fails fast; the script must still say so section by section
    # and leave the summary and the archive, as it would after a section timed out.
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_SECONDS": "300"}
    env.pop("GPU_CHECK_MAMBA_SSM_SDISTS", None)
    env["PYTHON"] = sys.executable
    # A section's own summary.md, as the block sweep writes, must go into the archive.
    nested = tmp_path / "bench_blocks" / "gpu-quick" / "summary.md"
    nested.parent.mkdir(parents=True)
    nested.write_text("sweep summary")
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check_results.tar.gz",
        "summary.md",
    ]
    with tarfile.open(tmp_path / "gpu_check_results.tar.gz") as archive:
        assert "./bench_blocks/gpu-quick/summary.md" in archive.getnames()
    summary = (tmp_path / "summary.md").read_text()
    titles = (
        "Triton kernel tests on CUDA",
        "permute_tokens bandwidth",
        "Blocks, backbones",
        "Recomputing in the mixer's backward",
        "A training step",
        "torch.compile",
        "replace_attention on timm models",
        "Scan strategies",
    )
    for title in titles:
        assert f"| {title}" in summary
    assert summary.count("| FAILED |") == 11
    assert "mamba-ssm" not in summary  # the optional sections run only when asked for
