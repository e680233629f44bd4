"""Checkpoint files: hashes, verification, the previous checkpoint, and injected faults."""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from train_helpers import flip_bit_in_tensor_data

from zigzag_mamba.train import checkpoint as checkpoint_module
from zigzag_mamba.train.checkpoint import (
    CheckpointError,
    hash_path,
    load_checkpoint,
    load_checkpoint_or_previous,
    previous_path,
    remove_stale_temporaries,
    save_checkpoint,
)

WEIGHTS = torch.linspace(1.0, 2.0, 1000)


def _state(step: int) -> dict:
    return {"step": step, "w": WEIGHTS * step}


def test_a_save_writes_the_sha256_beside_the_checkpoint(tmp_path):
    path = save_checkpoint(_state(1), tmp_path / "last.pt")
    digest, name = hash_path(path).read_text().split()
    assert name == "last.pt" and digest == checkpoint_module.file_sha256(path)
    assert load_checkpoint(path)["step"] == 1


def test_flipped_bits_in_a_tensor_are_refused_with_the_file_named(tmp_path):
    path = save_checkpoint(_state(2), tmp_path / "last.pt")
    flip_bit_in_tensor_data(path, WEIGHTS * 2)
    # torch.load alone reads the corrupted weights without complaint.
    assert not torch.equal(torch.load(path, weights_only=True)["w"], WEIGHTS * 2)
    with pytest.raises(CheckpointError, match=rf"{path} does not match its SHA-256"):
        load_checkpoint(path)


def test_without_its_hash_a_checkpoint_is_checked_by_its_crcs(tmp_path):
    path = save_checkpoint(_state(2), tmp_path / "last.pt")
    hash_path(path).unlink()
    assert load_checkpoint(path)["step"] == 2
    flip_bit_in_tensor_data(path, WEIGHTS * 2)
    with pytest.raises(CheckpointError, match=rf"{path} is corrupted: entry .* fails its CRC"):
        load_checkpoint(path)


def _write(path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_checkpoint(_state(1), path)
        hash_path(path).unlink()
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("hello")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"step": 1, "object": object}))
    elif kind == "arbitrary object":
        torch.save({"step": 1, "fn": os.path.join}, path)
    elif kind == "a tensor":
        torch.save(torch.ones(3), path)
    elif kind == "missing keys":
        torch.save({"step": 1}, path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "is empty"),
        ("truncated", "is not a checkpoint: not a zip archive"),
        ("text", "is not a checkpoint: not a zip archive"),
        ("pickle", "is not a checkpoint: not a zip archive"),
        ("arbitrary object", "holds objects other than tensors and plain containers"),
        ("a tensor", "is not a zigma training checkpoint: it holds a Tensor"),
        ("missing keys", r"is not a zigma training checkpoint: it lacks \['model'\]"),
    ],
)
def test_unusable_files_give_one_clear_message_naming_them(tmp_path, kind, message):
    path = tmp_path / "ckpt.pt"
    _write(path, kind)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, required=("step", "model"))
    assert str(path) in str(info.value)


def test_rotation_keeps_the_previous_checkpoint_with_its_hash(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path, rotate=True)
    previous = previous_path(path)
    assert previous.name == "previous.pt"
    assert load_checkpoint(previous)["step"] == 1 and load_checkpoint(path)["step"] == 2
    assert hash_path(previous).read_text().split()[0] == checkpoint_module.file_sha256(previous)


def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path, rotate=True)
    flip_bit_in_tensor_data(path, WEIGHTS * 2)
    with pytest.warns(RuntimeWarning, match=r"does not match its SHA-256.*previous\.pt"):
        state, used = load_checkpoint_or_previous(path)
    assert used == previous_path(path) and state["step"] == 1
    flip_bit_in_tensor_data(previous_path(path), WEIGHTS)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(CheckpointError, match="the previous checkpoint fails too"),
    ):
        load_checkpoint_or_previous(path)


class _Killed(BaseException):
    """Stands in for SIGKILL."""


@contextlib.contextmanager
def _killed_at(operation: int, monkeypatch) -> Iterator[list]:
    """Within it, the ``operation``-th rename or deletion of a file and all after it raise
    :class:`_Killed` (so a temporary file stays behind, as after a kill); yields the list of
    operations run, which ends with "killed" if one was stopped."""
    done: list = []

    def counted(real):
        def run(*args, **kwargs):
            if len(done) >= operation:
                done[operation:] = ["killed"]
                raise _Killed
            done.append(args)
            return real(*args, **kwargs)

        return run

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.os, "replace", counted(os.replace))
        patch.setattr(pathlib.Path, "unlink", counted(pathlib.Path.unlink))
        yield done


@pytest.mark.parametrize("rotate", [True, False])
def test_a_kill_between_any_two_file_operations_leaves_a_verified_checkpoint(
    tmp_path, monkeypatch, rotate
):
    for operation in range(32):
        path = tmp_path / str(operation) / "last.pt"
        save_checkpoint(_state(1), path)
        save_checkpoint(_state(2), path, rotate=True)
        with _killed_at(operation, monkeypatch) as done, contextlib.suppress(_Killed):
            save_checkpoint(_state(3), path, rotate=rotate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a fallback is fine here
            state, used = load_checkpoint_or_previous(path)
        # Either the new checkpoint, or the one it replaced (perhaps kept as the previous one).
        assert state["step"] in ((2, 3) if used == path else (1, 2))
        for file in path.parent.glob("*.pt"):
            if hash_path(file).is_file():  # a hash, when present, is always its file's
                assert hash_path(file).read_text().split()[0] == checkpoint_module.file_sha256(file)
        if done[-1:] != ["killed"]:  # the save finished before this operation
            assert state["step"] == 3
            return
    pytest.fail("a save made more than 32 renames and deletions")


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".last.pt.{dead_pid}.tmp", tmp_path / f".last.pt.sha256.{dead_pid}.tmp"]
    live = [tmp_path / f".last.pt.{os.getpid()}.tmp", tmp_path / f".last.pt.{os.getppid()}.tmp"]
    other = [tmp_path / "last.pt", tmp_path / f"notes.{dead_pid}.tmp"]
    for file in (*stale, *live, *other):
        file.write_bytes(b"partial")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted((*live, *other))
