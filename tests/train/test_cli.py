import json

import pytest
import torch
from PIL import Image

from zigzag_mamba.cli import build_parser, main
from zigzag_mamba.train.checkpoint import load_checkpoint
from zigzag_mamba.train.cli import resolve_train_options

TINY = [
    "--data", "digits", "--batch-size", "8", "--model-arg", "dim=16", "--model-arg", "depth=2",
    "--sample-steps", "2", "--grid-rows", "2", "--grid-columns", "10", "--no-progress",
    "--log-every", "1", "--ckpt-every", "0",
]  # fmt: skip


@pytest.mark.parametrize("command", ["train", "sample", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: zigma " + command in capsys.readouterr().out


def test_options_merge_defaults_file_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.003\nsteps: 50\nmodel: {name: ZigMa-T/2, depth: 6}\ndata: photos/\n")
    args = build_parser().parse_args(
        ["train", "--config", str(config), "--steps", "7", "--model-arg", "pattern=sweep2"]
    )
    train, run = resolve_train_options(args)
    assert (train.lr, train.steps, train.batch_size) == (0.003, 7, 64)
    assert run["model"] == {"name": "ZigMa-T/2", "depth": 6, "pattern": "sweep2"}
    assert run["data"] == "photos/" and run["resume"] is None
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown training options: learning_rate"):
        resolve_train_options(
            build_parser().parse_args(["train", "--config", str(tmp_path / "bad.json")])
        )


def test_train_resume_and_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    assert main(["train", *TINY, "--steps", "3", "--out-dir", str(out), "--resume"]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["config"]["model"]["depth"] == 2
    assert [line.split(",")[0] for line in (out / "loss.csv").read_text().splitlines()] == [
        "step",
        "1",
        "2",
        "3",
    ]
    assert json.loads((out / "config.json").read_text())["model"]["num_classes"] == 10
    grid = tmp_path / "grid.png"
    raw = tmp_path / "raw.pt"
    args = [
        "sample",
        "--ckpt",
        str(out / "checkpoints" / "last.pt"),
        "--num",
        "20",
        "--columns",
        "10",
    ]
    assert (
        main(
            [
                *args,
                "--steps",
                "2",
                "--out",
                str(grid),
                "--save-tensor",
                str(raw),
                "--labels",
                "3",
                "7",
            ]
        )
        == 0
    )
    saved = torch.load(raw, weights_only=True)
    assert saved["samples"].shape == (20, 1, 8, 8) and saved["labels"][:4].tolist() == [3, 7, 3, 7]
    assert Image.open(grid).size == (8 * (10 * 9 + 1), 8 * (2 * 9 + 1))
    assert "wrote 20 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "zigma sample: checkpoint {} is empty"),
        ("truncated", "zigma sample: {} is not a checkpoint: not a zip archive"),
        ("another file", "zigma sample: {} is not a zigma training checkpoint: it lacks"),
    ],
)
def test_sample_names_an_unusable_checkpoint_in_one_message(tmp_path, kind, message):
    path = tmp_path / "last.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"step": 1, "model": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        torch.save({"samples": torch.ones(3)}, path)
    with pytest.raises(SystemExit) as info:
        main(["sample", "--ckpt", str(path)])
    assert str(info.value.code).startswith(message.format(path))


def test_train_resume_from_an_unusable_file_is_one_clear_message(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "run"
    code = main(["train", *TINY, "--steps", "1", "--out-dir", str(out), "--resume", str(bad)])
    assert code == 1
    assert f"zigma train: {bad} is not a checkpoint" in capsys.readouterr().err


def test_random_flip_on_digits_is_refused_not_recorded(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="random_flip applies to image folders only"):
        main(["train", *TINY, "--random-flip", "--steps", "1", "--out-dir", str(out)])
    assert not (out / "config.json").exists()
