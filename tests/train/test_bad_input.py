"""Bad input and faults, run as a user would meet them: each error names the flag or the file and
what is allowed, and nothing already in the run folder is lost (docs/failure_modes.md)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from zigzag_mamba import CONFIGS, ZigMaBackbone, ZigMaBlock
from zigzag_mamba.cli import main
from zigzag_mamba.train import TrainConfig
from zigzag_mamba.train.checkpoint import CheckpointError, hash_path, load_checkpoint
from zigzag_mamba.train.config import OptionError
from zigzag_mamba.train.data import ImageFolder, open_dataset
from zigzag_mamba.train.lock import LOCK_NAME, RunFolderBusy, RunLock
from zigzag_mamba.train.tensor_files import TensorFileDataset

TINY = [
    "--data", "digits", "--batch-size", "8", "--model-arg", "dim=16", "--model-arg", "depth=2",
    "--sample-steps", "2", "--grid-rows", "2", "--grid-columns", "10", "--no-progress",
    "--log-every", "1", "--ckpt-every", "0",
]  # fmt: skip
HOLD = (
    "import sys, time\n"
    "from zigzag_mamba.train.lock import RunLock\n"
    "with RunLock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(60)\n"
)


def _snapshot(folder) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _train(out, *extra) -> int:
    return main(["train", *TINY, "--out-dir", str(out), *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-step run."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert _train(out, "--steps", "2") == 0
    return out


def _holder(folder):
    """A process that holds ``folder``'s lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    return holder


# -- one writer per run folder --------------------------------------------------------------


def test_a_second_trainer_in_a_busy_folder_is_refused_before_it_writes(finished_run, capsys):
    before = _snapshot(finished_run)
    holder = _holder(finished_run)
    try:
        assert _train(finished_run, "--steps", "4", "--resume") == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert (
        f"zigma train: {finished_run} is being written by another run (process {holder.pid}" in err
    )
    after = _snapshot(finished_run)
    after.pop(LOCK_NAME)  # the killed holder's lock, left behind
    assert after == before


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).is_file()
    assert _train(out, "--steps", "1") == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of {out}: process {holder.pid}" in err
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    with RunLock(tmp_path), RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).is_file()
        code = (
            f"from zigzag_mamba.train.lock import RunLock\nRunLock({str(tmp_path)!r}).__enter__()"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode != 0 and "RunFolderBusy" in result.stderr
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass
    assert issubclass(RunFolderBusy, RuntimeError)


# -- nothing rewritten before the run is validated ------------------------------------------


def test_a_misspelt_resume_path_is_refused_before_config_json_changes(finished_run):
    before = _snapshot(finished_run)
    typo = finished_run / "checkpoints" / "lats.pt"
    with pytest.raises(SystemExit, match=rf"--resume {typo}: no such checkpoint"):
        main(["train", "--out-dir", str(finished_run), "--resume", str(typo), "--steps", "3"])
    assert _snapshot(finished_run) == before
    with pytest.raises(SystemExit, match="a folder, not a checkpoint file"):
        main(["train", "--out-dir", str(finished_run), "--resume", str(finished_run)])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sample-method", "bogus"], "--sample-method 'bogus': must be one of euler, heun"),
        (["--warmup-steps", "-5"], "--warmup-steps -5: must be >= 0"),
        (["--log-every", "0"], "--log-every 0: must be >= 1"),
        (["--ckpt-every", "-1"], "--ckpt-every -1: must be >= 0"),
        (["--sample-every", "-3"], "--sample-every -3: must be >= 0"),
        (["--max-seconds", "-1"], "--max-seconds -1.0: must be >= 0"),
        (["--grad-clip", "-1"], "--grad-clip -1.0: must be >= 0"),
        (["--lr", "nan"], "--lr nan: must be a finite number"),
        (["--beta2", "1"], "--beta2 1.0: must be >= 0 and < 1"),
        (["--device", "tpu"], "--device 'tpu': must be auto, cpu, cuda"),
        (["--image-size", "0"], "image_size (--image-size) must be an int from 1 to 16384"),
        (["--image-size", "100000"], "image_size (--image-size) must be an int from 1 to 16384"),
        (["--out-dir", ""], "--out-dir '': must be a folder name"),
    ],
)
def test_an_option_out_of_range_is_refused_before_any_work(tmp_path, flags, message):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--steps", "1000", "--out-dir", str(out), *flags]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert message in str(info.value.code)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_cpu_only_machine_is_named():
    with pytest.raises(OptionError, match="this PyTorch sees no CUDA device"):
        TrainConfig(device="cuda")


def test_an_option_of_a_config_file_or_config_json_names_the_file(tmp_path, finished_run):
    config = tmp_path / "run.yaml"
    config.write_text("warmup_steps: -2\n")
    with pytest.raises(SystemExit, match=rf"warmup_steps = -2 in {config}: must be >= 0"):
        _train(tmp_path / "a", "--config", str(config), "--steps", "1")
    text = tmp_path / "run.txt"
    text.write_text('{"steps": 3}')
    with pytest.raises(SystemExit, match=rf"config file {text}: the name must end in .json"):
        _train(tmp_path / "b", "--config", str(text))
    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": ')
    with pytest.raises(SystemExit, match=rf"config file {broken} does not parse"):
        _train(tmp_path / "c", "--config", str(broken))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"steps": ', "is not the JSON object zigma train writes"),
        ("[1, 2]", "must hold an object of options with a 'model' object"),
        ('{"lr": "fast", "model": {"name": "ZigMa-T/1"}}', "lr = 'fast' in {}"),
    ],
)
def test_a_damaged_run_config_json_is_named(tmp_path, content, message):
    out = tmp_path / "run"
    assert _train(out, "--steps", "1") == 0
    (out / "config.json").write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["train", "--out-dir", str(out), "--resume", "--steps", "2"])
    assert message.format(out / "config.json") in str(info.value.code)
    assert str(out / "config.json") in str(info.value.code)


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "run"
    file.write_text("notes")
    with pytest.raises(SystemExit, match=r"--out-dir '.*run': must be a folder, not a file"):
        _train(file, "--steps", "1")
    assert file.read_text() == "notes"


def test_steps_0_reports_only_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "0") == 0
    printed = capsys.readouterr().out
    assert "samples:" not in printed and not (out / "samples").exists()


# -- zigma sample -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cfg-channels", "abc"], "must be 'all' or a positive integer, got abc"),
        (["--cfg-scale", "nan"], "must be a finite number >= 0, got nan"),
        (["--steps", "0"], "must be a positive integer"),
        (["--method", "bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_sample_flags_are_checked_when_parsed(finished_run, flags, message, capsys):
    ckpt = str(finished_run / "checkpoints" / "last.pt")
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", ckpt, *flags])
    assert message in capsys.readouterr().err


def test_sample_checks_channels_and_the_output_name(finished_run, tmp_path):
    ckpt = str(finished_run / "checkpoints" / "last.pt")
    with pytest.raises(SystemExit, match="--cfg-channels 5: the model has 1 channels"):
        main(["sample", "--ckpt", ckpt, "--cfg-channels", "5", "--out", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit, match=r"--out .*grid: the grid's file name must end in"):
        main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "grid")])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_whose_spec_disagrees_with_its_weights_is_named(finished_run, tmp_path):
    state = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["depth"] = 3
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(SystemExit, match=rf"checkpoint {bad}: its 'ema' weights do not fit"):
        main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "g.png")])


# -- files named in their errors --------------------------------------------------------------


def test_checkpoint_paths_and_hash_files_are_named(finished_run, tmp_path):
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path} is a folder"):
        load_checkpoint(tmp_path)
    copy = tmp_path / "last.pt"
    copy.write_bytes((finished_run / "checkpoints" / "last.pt").read_bytes())
    hash_path(copy).mkdir()
    with pytest.raises(
        CheckpointError, match=rf"the hash file {hash_path(copy)} .* cannot be read"
    ):
        load_checkpoint(copy)
    hash_path(copy).rmdir()
    hash_path(copy).write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match=rf"the hash file {hash_path(copy)}"):
        load_checkpoint(copy)


def test_a_pretrained_folder_with_a_bad_config_is_named(tmp_path):
    model = ZigMaBackbone(input_size=8, in_channels=1, **CONFIGS["ZigMa-T/2"])
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("dim: 64\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not JSON"):
        ZigMaBackbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"dim": 64, "depht": 2}')
    with pytest.raises(ValueError, match=r"does not describe a ZigMaBackbone.*depht"):
        ZigMaBackbone.from_pretrained(tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0.2, 1.7, 0.9]), "must be integer class ids, got torch.float32"),
        (torch.tensor([0, -1, 2]), r"must be class ids >= 0, got \[-1\]"),
        (torch.tensor([[0, 1, 2]]), r"must have shape \(3,\)"),
    ],
)
def test_latent_labels_must_be_integer_class_ids(tmp_path, labels, message):
    path = tmp_path / "latents.pt"
    torch.save({"latents": torch.randn(3, 4, 8, 8), "labels": labels}, path)
    with pytest.raises(ValueError, match=rf"labels in {path} {message}"):
        TensorFileDataset(path)


def test_implausible_label_counts_warn_and_payloads_are_refused_by_name(tmp_path, capsys):
    path = tmp_path / "latents.pt"
    torch.save(
        {"latents": torch.randn(3, 4, 8, 8), "labels": torch.tensor([0, 1, 5_000_000])}, path
    )
    with pytest.warns(RuntimeWarning, match="makes 5000001 classes for 3 samples"):
        assert TensorFileDataset(path).num_classes == 5_000_001
    torch.save({"latents": _Payload()}, path)
    with pytest.raises(ValueError, match=rf"data file {path} holds objects other than tensors"):
        TensorFileDataset(path)
    assert "must never run" not in capsys.readouterr().out
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"data file {path} cannot be read"):
        TensorFileDataset(path)


def test_16_bit_palette_and_transparent_images_are_converted(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    x, _ = ImageFolder(tmp_path, channels=1)[0]
    expected = np.round(ramp / 65535 * 255) / 127.5 - 1  # scaled, not clipped to white
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    assert x.min() < -0.9 and x.max() > 0.9
    (tmp_path / "deep.png").unlink()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but half of it transparent
    rgba[:2, :, 3], rgba[2:, :, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    x, _ = ImageFolder(tmp_path)[0]
    assert torch.equal(x[0, :2], torch.full((2, 4), -1.0)) and torch.equal(
        x[0, 2:], torch.ones(2, 4)
    )
    (tmp_path / "clear.png").unlink()
    Image.new("F", (4, 4)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=rf"image {tmp_path / 'float.tif'} is a 32-bit float"):
        ImageFolder(tmp_path)


def test_digits_at_size_0_are_refused_not_silently_8():
    with pytest.raises(ValueError, match=r"image_size .* must be an int from 1"):
        open_dataset("digits", image_size=0)


# -- sizes ------------------------------------------------------------------------------------


def test_a_grid_too_large_for_memory_is_estimated_before_allocating():
    block = ZigMaBlock(8)
    with pytest.raises(MemoryError, match=r"grid \(100000, 100000\) would need about 894"):
        block(torch.randn(1, 10**10, 8, device="meta"), grid=(100000, 100000))
    with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 10000000000, C\)"):
        block(torch.randn(1, 4, 8), grid=(100000, 100000))  # checked before any order is built


def test_drawing_a_huge_grid_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="a picture shows at most 16384 tokens"):
        main(["orders", "--grid", "3000", "3000"])
    assert time.perf_counter() - start < 30


# -- the modules name the mismatch ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_tokens_of_another_dtype_than_the_block_are_named(dtype):
    block = ZigMaBlock(16, (2, 3))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=rf"Mamba got {name} inputs, but its weights are float32"):
        block(torch.randn(1, 6, 16, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed
        assert block(torch.randn(1, 6, 16, dtype=torch.bfloat16)).shape == (1, 6, 16)
    model = ZigMaBackbone(input_size=4, in_channels=1, **CONFIGS["ZigMa-T/2"])
    with pytest.raises(TypeError, match=rf"ZigMaBackbone got {name} inputs, but its weights"):
        model(torch.randn(1, 1, 4, 4, dtype=dtype), torch.rand(1))


def test_context_width_and_cfg_halves_are_named():
    block = ZigMaBlock(16, (2, 3), context_dim=12)
    with pytest.raises(
        ValueError, match=r"context must have shape \(B, S, context_dim\) = \(1, S, 12\)"
    ):
        block(torch.randn(1, 6, 16), c=torch.randn(1, 16), context=torch.randn(1, 5, 7))
    model = ZigMaBackbone(input_size=4, in_channels=1, num_classes=3, **CONFIGS["ZigMa-T/2"])
    with pytest.raises(ValueError, match="an even batch, got 3"):
        model.forward_with_cfg(torch.randn(3, 1, 4, 4), torch.rand(3), torch.tensor([0, 1, 3]), 2.0)


# -- persistence faults -----------------------------------------------------------------------

_DISK_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from zigzag_mamba.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_during_a_checkpoint_loses_nothing(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    limit = str(os.path.getsize(last) // 2)  # room for the logs, not for a checkpoint
    argv = ["train", *TINY, "--out-dir", str(out), "--resume", "--steps", "3"]
    result = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, limit, *argv], capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr
    assert f"zigma train: could not write the checkpoint {last}" in result.stderr
    assert "the checkpoint there before, if any, is intact" in result.stderr
    assert last.read_bytes() == before and load_checkpoint(last)["step"] == 2
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_rewrite_of_config_json_keeps_the_old_one(finished_run, monkeypatch):
    config = finished_run / "config.json"
    before = config.read_bytes()

    def broken_replace(src, dst):
        raise KeyboardInterrupt  # as if the process were stopped mid-rename

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--out-dir", str(finished_run), "--resume", "--steps", "3", "--no-progress"])
    assert config.read_bytes() == before
    assert not [p for p in finished_run.iterdir() if p.name.endswith(".tmp")]
    assert not (finished_run / LOCK_NAME).exists()


def test_sampler_arguments_are_checked_in_python_too():
    from zigzag_mamba.train import generate, sample_ode

    with pytest.raises(ValueError, match="method must be one of euler, heun"):
        sample_ode(lambda x, t: x, torch.zeros(2, 2), 4, "bogus")
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        generate(lambda x, t, y: x, torch.zeros(2, 2), labels=torch.zeros(2), cfg_scale=math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert json.dumps(TrainConfig().to_dict())
