import json
import re

import pytest
import torch
from PIL import Image

from zigzag_mamba.cli import build_parser, main
from zigzag_mamba.train.apps.options import DEFAULT_MODEL, resolve_train_options
from zigzag_mamba.train.checkpoint import load_checkpoint

TINY = [
    "--data", "digits", "--batch-size", "8", "--model-arg", "dim=16", "--model-arg", "depth=2",
    "--sample-steps", "2", "--grid-rows", "2", "--grid-columns", "10", "--no-progress",
    "--log-every", "1", "--ckpt-every", "0",
]  # fmt: skip


COMMANDS = ["orders", "train", "sample", "demo", "encode", "ablate", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_plain_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "usage: zigma " + command in text
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default: ", text), "a default said twice"
    assert "``" not in text and ":func:" not in text, "reST in the help"
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help text"


def test_train_help_shows_the_defaults_of_data_and_model(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: digits)" in text and f"(default: {DEFAULT_MODEL})" in text


@pytest.mark.parametrize("command", ["train", "sample", "bench"])
def test_threads_must_be_positive(command, capsys):
    required = ["--ckpt", "x.pt"] if command == "sample" else []
    assert build_parser().parse_args([command, *required, "--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, *required, "--threads", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_threads_set_torchs_thread_count_at_the_start(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "1", "--out-dir", str(out), "--threads", "1"]) == 0
    assert calls[0] == 1
    calls.clear()
    ckpt = str(out / "checkpoints" / "last.pt")
    args = ["sample", "--ckpt", ckpt, "--num", "2", "--steps", "1", "--threads", "3"]
    assert main([*args, "--out", str(tmp_path / "g.png")]) == 0
    assert calls[0] == 3


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


def _steps(out):
    return [line.split(",")[0] for line in (out / "loss.csv").read_text().splitlines()[1:]]


def test_resume_takes_the_runs_options_from_its_config_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    # Only the folder: the model (dim 16, depth 2), batch and logging come from config.json.
    resume = ["train", "--out-dir", str(out), "--resume", "--no-progress"]
    assert main([*resume, "--steps", "3"]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["config"]["model"]["depth"] == 2
    assert state["config"]["train"]["batch_size"] == 8 and _steps(out) == ["1", "2", "3"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["model"]["dim"] == 16
    err = capsys.readouterr().err
    assert "options changed from" in err and "--steps 3 (the run: 2)" in err


def test_resume_names_every_option_that_differs_from_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    before = (out / "loss.csv").read_text()
    config = tmp_path / "more.yaml"
    config.write_text("seed: 5\nmodel: {name: ZigMa-T/1, pattern: sweep2}\n")
    argv = [
        "train", "--out-dir", str(out), "--resume", "--steps", "4", "--batch-size", "16",
        "--model", "ZigMa-S/2", "--model-arg", "depth=4", "--model-arg", "dim=16",
        "--config", str(config), "--data", "digits",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith(f"zigma train: --resume continues the run in {out} as ")
    for part in (
        "--batch-size 16 (the run: 8)",
        "--model ZigMa-S/2 (the run: ZigMa-T/1)",
        "--model-arg depth=4 (the run: depth=2)",
        f"seed: 5 in {config} (the run: 0)",
        f"pattern: sweep2 in {config} (the run: zigzag8)",
    ):
        assert part in message
    assert "dim=16" not in message and "--data" not in message and "--steps" not in message
    assert (out / "loss.csv").read_text() == before  # nothing trained


def test_resume_may_change_the_schedule_and_the_learning_rate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    resume = ["train", *TINY, "--out-dir", str(out), "--resume"]
    assert main([*resume, "--steps", "3", "--lr", "0.001", "--log-every", "5"]) == 0
    err = capsys.readouterr().err
    assert "--lr 0.001 (the run: 0.0001)" in err and "--log-every 5 (the run: 1)" in err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001


def test_resume_without_config_json_uses_the_checkpoints_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    (out / "config.json").unlink()
    resume = ["train", "--out-dir", str(out), "--resume", "--no-progress"]
    assert main([*resume, "--steps", "3"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["config"]["model"]["dim"] == 16
    (out / "config.json").unlink()
    with pytest.raises(SystemExit, match=r"as the config stored in .*last\.pt describes it"):
        main([*resume, "--steps", "4", "--model-arg", "depth=3"])


def test_resume_from_another_models_checkpoint_is_one_clear_message(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "1", "--out-dir", str(tmp_path / "a")]) == 0
    b = tmp_path / "b"
    assert (
        main(["train", *TINY, "--steps", "1", "--out-dir", str(b), "--model-arg", "depth=3"]) == 0
    )
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    assert main(["train", "--out-dir", str(b), "--resume", str(ckpt), "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert f"zigma train: checkpoint {ckpt} holds the weights of another model (depth: 2" in err


def test_data_that_does_not_fit_the_model_is_named(tmp_path):
    argv = ["train", *TINY, "--steps", "1", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"the data 'digits' \(1x8x8, 10 classes\) does not fit "):
        main([*argv, "--model-arg", "in_channels=3"])


def test_mixed_image_sizes_name_the_image_size_flag(tmp_path):
    for name, size in (("a.png", (6, 4)), ("b.png", (5, 5))):
        Image.new("RGB", size).save(tmp_path / name)
    argv = ["train", "--data", str(tmp_path), "--steps", "1", "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"different sizes .*pass --image-size \(or size="):
        main(argv)


def test_sample_draws_one_row_per_class_by_default(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "1", "--out-dir", str(out)]) == 0
    raw = tmp_path / "raw.pt"
    argv = ["sample", "--ckpt", str(out / "checkpoints" / "last.pt"), "--steps", "1"]
    grid = str(tmp_path / "grid.png")
    assert main([*argv, "--columns", "3", "--save-tensor", str(raw), "--out", grid]) == 0
    labels = torch.load(raw, weights_only=True)["labels"]
    assert labels.view(10, 3).tolist() == [[digit] * 3 for digit in range(10)]
