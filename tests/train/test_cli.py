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
