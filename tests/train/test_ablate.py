import csv
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from zigzag_mamba import orders
from zigzag_mamba.cli import main
from zigzag_mamba.train.ablate import AblationConfig, AblationError, config_with_preset
from zigzag_mamba.train.ablate import run as ablate_run
from zigzag_mamba.train.ablate.config import split_arm
from zigzag_mamba.train.ablate.data import Evaluation, open_study_data
from zigzag_mamba.train.ablate.photos import PhotoCrops
from zigzag_mamba.train.ablate.report import summarise
from zigzag_mamba.train.ablate.stats import (
    TooFewSeedsError,
    estimate,
    paired_differences,
    paired_estimate,
)
from zigzag_mamba.train.interpolant import Interpolant

QUICK = ["ablate", "--quick", "--no-progress"]
# Two-sided 95% Student-t critical values from a printed t table (2 and 3 degrees of freedom).
T_975_2DOF, T_975_3DOF = 4.302653, 3.182446


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "quick"
    assert main([*QUICK, "--out-dir", str(out)]) == 0
    return out


# -- the smoke test --------------------------------------------------------------------------


def test_quick_ablation_writes_every_output(quick_study):
    out = quick_study
    for name in ("protocol.json", "reference.json", "runs.csv", "runs.json", "summary.md"):
        assert (out / name).is_file(), name
    assert (out / "ablation.png").stat().st_size > 10_000
    with open(out / "runs.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["pattern"], r["seed"], r["steps"]) for r in rows] == [
        ("sweep", "0", "20"),
        ("zigzag8", "0", "20"),
    ]
    report = json.loads((out / "runs.json").read_text())
    for run in report["runs"]:
        assert 0 < run["heldout_loss"] < 10 and 0 <= run["fd"] < math.inf
        assert len(run["heldout_loss_by_t"]) == 4 and len(run["loss_curve"]["step"]) == 20
        run_dir = out / "runs" / run["pattern"] / "seed_0"
        assert (run_dir / "result.json").is_file() and (run_dir / "loss.csv").is_file()
        assert not (run_dir / "checkpoints").exists()  # removed once the run is finished
    # One seed: no spread, no interval; the baseline is compared with itself by nothing.
    sweep, zigzag8 = report["summary"]
    assert math.isnan(sweep["heldout_loss"]["std"]) and math.isnan(sweep["fd"]["low"])
    difference = sweep["heldout_loss"]["mean"] - zigzag8["heldout_loss"]["mean"]
    assert sweep["heldout_loss_vs_baseline"]["mean"] == pytest.approx(difference)
    summary = (out / "summary.md").read_text()
    assert "| `sweep` | 1 |" in summary and "(baseline)" in summary


def test_the_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--help"])
    assert exit_info.value.code == 0
    assert "--patterns" in capsys.readouterr().out


# -- resuming --------------------------------------------------------------------------------


def _counting_runs(monkeypatch) -> list:
    trained = []
    real = ablate_run.train_and_score

    def counted(config, pattern, seed, *args):
        trained.append((pattern, seed))
        return real(config, pattern, seed, *args)

    monkeypatch.setattr(ablate_run, "train_and_score", counted)
    return trained


def test_finished_runs_are_not_redone(quick_study, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(quick_study, out)
    before = json.loads((out / "runs.json").read_text())["runs"]
    trained = _counting_runs(monkeypatch)
    config = config_with_preset("quick", out_dir=str(out), progress=False)
    assert ablate_run.run_ablation(config)["runs"] == before
    assert trained == []
    # A run that lost its result (killed before it finished) is the only one trained again.
    (out / "runs" / "zigzag8" / "seed_0" / "result.json").unlink()
    ablate_run.run_ablation(config)
    assert trained == [("zigzag8", 0)]


def test_resuming_with_another_protocol_names_the_differences(quick_study, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(quick_study, out)
    assert main([*QUICK, "--out-dir", str(out), "--steps", "21", "--lr", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "different protocol" in error
    for key in ("settings.steps", "train.steps", "settings.lr", "train.lr"):
        assert key in error
    assert "settings.dim" not in error


# -- pairing ---------------------------------------------------------------------------------


def test_one_seed_gives_every_pattern_the_same_initial_weights():
    config = AblationConfig(dim=16, depth=2)
    shape = (3, 8, 8)

    def weights(pattern, seed):
        return ablate_run.build_run_model(config, shape, pattern, seed)[0].state_dict()

    reference = weights("zigzag8", 0)
    for pattern in ("none", "sweep", "random8", "hilbert8"):
        other = weights(pattern, 0)
        assert all(torch.equal(reference[name], other[name]) for name in reference)
    seed_1 = weights("zigzag8", 1)
    assert any(not torch.equal(reference[name], seed_1[name]) for name in reference)


def test_photo_training_crops_never_touch_the_held_out_tiles():
    train, test = PhotoCrops("train", 8, count=4000, seed=3), PhotoCrops("eval", 8)
    held = train.held_out
    assert 0.15 < held.float().mean() < 0.25
    for _, top, left in train.corners.tolist():
        assert not held[top : top + 8, left : left + 8].any()
    for _, top, left in test.corners.tolist():
        assert held[top : top + 8, left : left + 8].all()
    again = PhotoCrops("train", 8, count=4000, seed=3)
    assert torch.equal(train.corners, again.corners) and torch.equal(train.flips, again.flips)
    assert not torch.equal(train.corners, PhotoCrops("train", 8, count=4000, seed=4).corners)


def test_the_frechet_distance_ranks_degraded_photos_below_real_ones():
    config = AblationConfig(data="photos")
    data = open_study_data(config)
    evaluation = Evaluation(data, config, Interpolant())
    train = data.train_set(0)
    real = torch.stack([train[i][0] for i in range(512)])
    blurred = torch.nn.functional.avg_pool2d(real, 3, 1, 1, count_include_pad=False)
    noisy = real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    score = evaluation.frechet(real)
    assert score < evaluation.frechet(noisy) and score < evaluation.frechet(blurred)
    assert evaluation.frechet(blurred) == evaluation.frechet(blurred)  # deterministic


# -- statistics on known inputs ----------------------------------------------------------------


def test_interval_matches_a_hand_computed_t_interval():
    result = estimate([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # sample sd of 1..4: sqrt(5/3)
    half = T_975_3DOF * std / math.sqrt(4)
    assert result.mean == 2.5 and result.n == 4
    assert result.std == pytest.approx(std, rel=1e-12)
    assert (result.low, result.high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-6)
    narrower = estimate([1.0, 2.0, 3.0, 4.0], confidence=0.5)
    assert narrower.half_width < result.half_width


def test_paired_differences_match_a_hand_computation():
    values = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}
    baseline = {0: 0.5, 1: 1.0, 2: 2.5, 5: 3.0}
    assert paired_differences(values, baseline) == {0: 0.5, 1: 1.0, 2: 1.5}
    result = paired_estimate(values, baseline)
    half = T_975_2DOF * 0.5 / math.sqrt(3)  # differences 0.5, 1.0, 1.5: mean 1, sd 0.5
    assert result.mean == pytest.approx(1.0) and result.std == pytest.approx(0.5)
    assert (result.low, result.high) == pytest.approx((1.0 - half, 1.0 + half), rel=1e-6)
    # Pairing removes what the seed does to both: an unpaired interval would be far wider.
    assert result.half_width < estimate([1.0, 2.0, 4.0]).half_width


def test_intervals_need_two_values():
    with pytest.raises(TooFewSeedsError, match="at least 2 seeds"):
        estimate([1.0])
    single = estimate([1.0], interval=False)
    assert single.mean == 1.0 and math.isnan(single.std) and math.isnan(single.low)
    with pytest.raises(ValueError, match="share no seeds"):
        paired_estimate({0: 1.0}, {1: 1.0})


def test_the_summary_pairs_each_pattern_with_the_baseline_seed_by_seed():
    fd = {"zigzag8": [1.0, 2.0, 3.0], "sweep": [1.5, 3.0, 4.5]}
    results = [
        {
            "pattern": pattern,
            "seed": seed,
            "heldout_loss": 0.1 * (seed + 1),
            "fd": value,
            "parameters": 100 if pattern == "sweep" else 120,
            "depth": 4,
            "train_flops": 10**6,
            "train_seconds": 10.0 * (seed + 1),
            "steps": 20,
        }
        for pattern, values in fd.items()
        for seed, value in enumerate(values)
    ]
    rows = {row["pattern"]: row for row in summarise(results, AblationConfig(seeds=[0, 1, 2]))}
    sweep = rows["sweep"]
    assert sweep["parameters"] == 100 and sweep["seconds_per_step"] == pytest.approx(1.0)
    assert sweep["seeds"] == [0, 1, 2] and sweep["fd"]["mean"] == pytest.approx(3.0)
    assert sweep["fd_vs_baseline"]["mean"] == pytest.approx(1.0)  # differences 0.5, 1, 1.5
    half = T_975_2DOF * 0.5 / math.sqrt(3)
    assert sweep["fd_vs_baseline"]["high"] == pytest.approx(1.0 + half, rel=1e-6)
    assert sweep["heldout_loss_vs_baseline"]["mean"] == pytest.approx(0.0)
    assert rows["zigzag8"]["fd_vs_baseline"]["mean"] == 0.0


# -- bad input -------------------------------------------------------------------------------


def test_an_arm_names_its_strategy_and_an_unknown_mixer_is_refused(tmp_path, capsys):
    assert split_arm("sweep4+cross") == ("sweep4", "cross")
    error = _error(capsys, "--out-dir", str(tmp_path / "a"), "--patterns", "sweep4+crossed")
    assert "unknown mixer(s) 'crossed'" in error and "cross" in error
    assert not (tmp_path / "a").exists()


def _error(capsys, *args: str) -> str:
    assert main([*QUICK, *args]) == 2
    return capsys.readouterr().err


def test_matched_arms_get_the_depth_nearest_the_baselines_parameter_count():
    config = config_with_preset("quick", depth=4, match="params")
    shape = (3, 8, 8)
    target = ablate_run._parameters(ablate_run._spec(config, shape, "zigzag8", 4))

    def miss(arm: str, depth: int) -> int:
        return abs(ablate_run._parameters(ablate_run._spec(config, shape, arm, depth)) - target)

    assert ablate_run.model_spec(config, shape, "zigzag8")["depth"] == 4
    for arm in ("zigzag8+bidirectional", "zigzag8+cross"):
        depth = ablate_run.model_spec(config, shape, arm)["depth"]
        assert depth < 4  # a block of either strategy has more parameters
        assert all(miss(arm, depth) <= miss(arm, d) for d in (depth - 1, depth + 1) if d >= 1)
    unmatched = config_with_preset("quick", depth=4)
    assert ablate_run.model_spec(unmatched, shape, "zigzag8+cross")["depth"] == 4


def test_a_bad_match_or_baseline_is_refused(tmp_path, capsys):
    out = str(tmp_path / "never")
    error = _error(capsys, "--out-dir", out, "--match", "flops")
    assert "match" in error and "none, params" in error
    error = _error(capsys, "--out-dir", out, "--baseline", "zigzag3")
    assert "unknown scan pattern(s) 'zigzag3'" in error and "--baseline" in error
    assert not (tmp_path / "never").exists()


def test_an_unknown_pattern_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "never"
    error = _error(capsys, "--out-dir", str(out), "--patterns", "zigzag8", "zigzag3")
    assert "unknown scan pattern(s) 'zigzag3'" in error and "hilbert8" in error
    assert not out.exists()


def test_a_pattern_that_does_not_fit_the_grid_is_refused(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "never")
    error = _error(capsys, "--out-dir", out, "--patterns", "video_st")
    assert "'video_st' does not fit the data's 4x4 token grid" in error
    monkeypatch.setitem(orders._PATTERNS, "fixed64", lambda grid: torch.arange(64)[None])
    error = _error(capsys, "--out-dir", out, "--patterns", "fixed64")
    assert "'fixed64' does not fit the data's 4x4 token grid" in error and "L = 16" in error


def test_empty_missing_and_unreadable_folders_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images found" in _error(capsys, "--data", str(empty))
    assert "does not exist" in _error(capsys, "--data", str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    assert "cannot read image" in _error(capsys, "--data", str(broken))


def test_intervals_with_one_seed_are_refused(capsys):
    error = _error(capsys, "--intervals")
    assert "confidence intervals need at least 2 seeds, got 1" in error
    with pytest.raises(AblationError, match="at least 2 seeds"):
        ablate_run.run_ablation(AblationConfig(seeds=[3, 3], intervals=True))


def test_a_folder_of_images_trains_and_holds_out_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(20):
        pixels = (torch.rand(12, 12, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{k:02d}.png")
    config = config_with_preset(
        "quick", data=str(folder), patterns=["zigzag8"], steps=2, batch_size=4, progress=False,
        out_dir=str(tmp_path / "out"),
    )  # fmt: skip
    report = ablate_run.run_ablation(config)
    assert report["reference"]["held_out_images"] == 4
    assert [run["pattern"] for run in report["runs"]] == ["zigzag8"]
