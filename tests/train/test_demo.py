import functools
import json

import pytest
import torch

from zigzag_mamba.train.apps import demo
from zigzag_mamba.train.data import DigitsDataset


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset("train"), DigitsDataset("test")


@pytest.fixture(scope="module")
def classifier(digits):
    train, _ = digits
    return demo.train_digit_classifier(train.images, train.labels, epochs=2)


def test_the_scorer_recognises_real_digits_and_rejects_mirrored_ones(digits, classifier):
    train, test = digits
    assert demo.accuracy(classifier, test.images, test.labels) > 0.85
    real = demo.score_samples(
        classifier, test.images[:200], test.labels[:200], test.images, train.images
    )
    mirrored = demo.score_samples(
        classifier, test.images[:200].flip(-1), test.labels[:200], test.images, train.images
    )
    assert real["class_accuracy"] > 0.85 and mirrored["class_accuracy"] < 0.6
    assert (
        real["frechet_distance"] < 2 * real["frechet_distance_real"] < mirrored["frechet_distance"]
    )


def test_a_tiny_demo_writes_every_output(tmp_path, monkeypatch):
    fast = functools.partial(demo.train_digit_classifier, epochs=1)
    monkeypatch.setattr(demo, "train_digit_classifier", fast)
    config = demo.DemoConfig(
        out_dir=str(tmp_path), steps=2, dim=16, depth=2, sample_steps=1, eval_per_class=2,
        progress=False,
    )  # fmt: skip
    threads = torch.get_num_threads()
    metrics = demo.run_demo(config)
    assert torch.get_num_threads() == threads
    for name in ("samples.png", "orders.png", "loss.csv", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] == 2
    assert 0 <= saved["class_accuracy"] <= 1 and saved["frechet_distance"] > 0
    assert saved["model"]["pattern"] == "zigzag8" and saved["model"]["patch_size"] == 2
