import csv
import json
import subprocess
import sys

import pytest
import torch
from train_helpers import TinyData, TinyNet, flip_bit_in_tensor_data, tiny_config

from zigzag_mamba.train import checkpoint as checkpoint_module
from zigzag_mamba.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from zigzag_mamba.train.trainer import NonFiniteLossError, Trainer, param_groups


def _train(out_dir, steps, resume=None, **overrides):
    torch.manual_seed(0)
    trainer = Trainer(TinyNet(), TinyData(), tiny_config(out_dir, steps=steps, **overrides))
    trainer.fit(resume=resume)
    return trainer


def _rows(out_dir):
    with open(out_dir / "loss.csv", newline="") as file:
        return list(csv.DictReader(file))


def _assert_same_state(a, b):
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {name}"


def test_resume_continues_exactly(tmp_path):
    straight = _train(tmp_path / "straight", 6)
    _train(tmp_path / "split", 3)
    resumed = _train(tmp_path / "split", 6, resume="auto")
    assert resumed.step == 6 and resumed.batches.epoch == straight.batches.epoch == 2
    _assert_same_state(straight.state_dict(), resumed.state_dict())
    rows, straight_rows = _rows(tmp_path / "split"), _rows(tmp_path / "straight")
    # the first run logged its last step, 3; the windows ending at 2 and 6 match
    assert [r["step"] for r in rows] == ["2", "3", "4", "6"]
    assert [r["step"] for r in straight_rows] == ["2", "4", "6"]
    assert (
        rows[0]["loss"] == straight_rows[0]["loss"]
        and rows[-1]["loss"] == straight_rows[-1]["loss"]
    )


def test_checkpoint_holds_everything_and_loads_safely(tmp_path):
    trainer = _train(tmp_path, 2)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert {"model", "ema", "optimizer", "step", "data", "rng", "config"} <= set(state)
    assert state["step"] == 2 and state["config"]["train"]["batch_size"] == 16
    assert state["optimizer"]["state"], "optimizer moments must be saved"
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
    _assert_same_state(trainer.state_dict(), state)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    def crash(state, file):
        file.write(b"\x80\x02partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


class _BreaksAfter(TinyNet):
    """Returns NaN in training mode after ``calls`` forward passes (the EMA copy, in eval
    mode, keeps working)."""

    def __init__(self, calls):
        super().__init__()
        self.left = calls

    def forward(self, x, t, y=None):
        self.left -= self.training
        out = super().forward(x, t, y)
        return out * float("nan") if self.left < 0 else out


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _BreaksAfter(calls=4 * 2)  # 2 micro-steps a step: step 5 breaks
    trainer = Trainer(
        model, TinyData(), tiny_config(tmp_path, steps=10, ckpt_every=2, sample_every=2)
    )
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5.*last\.pt, is kept"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_gradients_are_clipped_before_the_optimizer_step(tmp_path):
    trainer = Trainer(TinyNet(), TinyData(), tiny_config(tmp_path, steps=2, grad_clip=1e-3))
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.fit()
    assert len(seen) == 2 and max(seen) <= 1e-3 * (1 + 1e-4)


def test_weight_decay_skips_tagged_and_one_dimensional_parameters():
    net = TinyNet()
    net.label.weight._no_weight_decay = True
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "inp.weight",
        "out.weight",
        "time.weight",
    ]
    assert "label.weight" in {names[id(p)] for p in no_decay["params"]}


def test_batch_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="multiple of"):
        Trainer(TinyNet(), TinyData(), tiny_config(tmp_path, batch_size=15))


def test_a_time_limit_ends_the_run_like_its_last_step(tmp_path):
    trainer = Trainer(TinyNet(), TinyData(), tiny_config(tmp_path, steps=100, max_seconds=1e-9))
    summary = trainer.fit()
    assert summary["step"] == 1 and summary["checkpoint"] == tmp_path / "checkpoints" / "last.pt"
    assert (tmp_path / "samples" / "step_0000001.png").is_file()
    assert _rows(tmp_path)[-1]["step"] == "1"


class _Checkpointable(TinyNet):
    def set_grad_checkpointing(self, enable=True):
        self.checkpointing = enable


def test_grad_checkpointing_flag_reaches_the_model(tmp_path):
    model = _Checkpointable()
    Trainer(model, TinyData(), tiny_config(tmp_path, grad_checkpointing=True))
    assert model.checkpointing is True
    with pytest.raises(ValueError, match="no set_grad_checkpointing"):
        Trainer(TinyNet(), TinyData(), tiny_config(tmp_path, grad_checkpointing=True))


def test_metric_hooks_run_on_ema_samples_with_each_grid(tmp_path):
    from zigzag_mamba.train.metrics import FrechetDistance

    seen = []
    extractor = torch.nn.Flatten()
    fd = FrechetDistance(extractor, TinyData().x)
    hook = lambda samples, labels: seen.append(labels.tolist()) or fd(samples, labels)
    config = tiny_config(tmp_path, steps=4, sample_every=2, eval_samples=8)
    Trainer(TinyNet(), TinyData(), config, metrics=[hook]).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    assert all(json.loads(line)["fd"] > 0 for line in lines)
    assert seen[0] == [0, 0, 1, 1, 2, 2, 3, 3]  # grid_columns = 2: one class per row


# -- faults: corrupted checkpoints, orphaned files, resuming past the end ------------------------


def _checkpoints(out_dir):
    return out_dir / "checkpoints" / "last.pt", out_dir / "checkpoints" / "previous.pt"


def test_resume_falls_back_from_a_corrupted_last_checkpoint_and_still_matches(tmp_path):
    straight = _train(tmp_path / "straight", 6)
    _train(tmp_path / "split", 4, ckpt_every=2)
    last, previous = _checkpoints(tmp_path / "split")
    assert load_checkpoint(previous)["step"] == 2
    flip_bit_in_tensor_data(last, load_checkpoint(last)["model"]["inp.weight"])
    with pytest.warns(RuntimeWarning, match=rf"{last} does not match its SHA-256.*previous\.pt"):
        resumed = _train(tmp_path / "split", 6, resume="auto")
    # From step 2, exactly as if nothing had happened after it.
    assert resumed.resumed_from == previous
    _assert_same_state(straight.state_dict(), resumed.state_dict())
    assert [r["step"] for r in _rows(tmp_path / "split")] == ["2", "4", "6"]


@pytest.mark.parametrize("fault", ["flipped bits", "truncated"])
def test_resume_refuses_when_no_verified_checkpoint_is_left(tmp_path, fault):
    _train(tmp_path, 4, ckpt_every=2)
    last, previous = _checkpoints(tmp_path)
    for path in (last, previous):
        if fault == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            flip_bit_in_tensor_data(path, load_checkpoint(path)["model"]["out.weight"])
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError) as info:
        _train(tmp_path, 6, resume="auto")
    assert str(last) in str(info.value) and str(previous) in str(info.value)


def test_a_kill_between_rotating_and_replacing_resumes_from_the_previous(tmp_path):
    _train(tmp_path, 4, ckpt_every=2)
    last, previous = _checkpoints(tmp_path)
    last.unlink()  # as if killed after last.pt became previous.pt, before the new one arrived
    with pytest.warns(RuntimeWarning, match="does not exist"):
        resumed = _train(tmp_path, 4, resume="auto")
    assert resumed.resumed_from == previous and resumed.step == 4


def test_a_nan_after_resume_names_the_verified_checkpoint(tmp_path):
    _train(tmp_path, 2)
    torch.manual_seed(0)
    trainer = Trainer(_BreaksAfter(calls=0), TinyData(), tiny_config(tmp_path, steps=4))
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError, match=rf"resumed from \(verified\), {last}, is kept"):
        trainer.fit(resume="auto")


def test_a_fresh_run_never_falls_back_to_another_runs_checkpoint(tmp_path):
    _train(tmp_path, 4, ckpt_every=2)
    last, previous = _checkpoints(tmp_path)
    _train(tmp_path, 1)  # a new run in the same folder, not resumed
    assert not previous.exists() and load_checkpoint(last)["step"] == 1


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphans = [
        tmp_path / "checkpoints" / f".last.pt.{int(gone.stdout)}.tmp",
        tmp_path / f".loss.csv.{int(gone.stdout)}.tmp",
    ]
    orphans[0].parent.mkdir()
    for orphan in orphans:
        orphan.write_bytes(b"half a checkpoint")
    _train(tmp_path, 1)
    assert not any(orphan.exists() for orphan in orphans)


def test_resuming_past_the_last_step_warns(tmp_path):
    _train(tmp_path, 4)
    with pytest.warns(RuntimeWarning, match=r"at step 4, past steps=2: there is nothing to train"):
        trainer = _train(tmp_path, 2, resume="auto")
    assert trainer.step == 4


def test_resuming_another_models_checkpoint_names_the_difference(tmp_path):
    def trainer(width, steps, spec=True):
        config = tiny_config(tmp_path, steps=steps)
        spec = {"name": "tiny", "width": width} if spec else None
        return Trainer(TinyNet(width=width), TinyData(), config, model_config=spec)

    trainer(8, 1).fit()
    with pytest.raises(CheckpointError, match=r"another model \(width: 8 there, 4 here\)"):
        trainer(4, 2).fit(resume="auto")
    with pytest.raises(CheckpointError, match=r"another model \(Error\(s\) in loading state_dict"):
        trainer(4, 2, spec=False).fit(resume="auto")
