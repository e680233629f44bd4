import json

import numpy as np
import pytest
import torch
from PIL import Image

from zigzag_mamba.cli import main
from zigzag_mamba.train.apps import video_demo
from zigzag_mamba.train.apps.demo import DigitClassifier
from zigzag_mamba.train.data import open_dataset
from zigzag_mamba.train.images import image_grid, save_clips
from zigzag_mamba.train.tensor_files import TensorFileDataset
from zigzag_mamba.train.videos import MovingDigits, VideoFolder


def _gif(path, shades, size=(6, 4)):
    frames = [Image.new("L", size, shade) for shade in shades]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:])


def _frames(folder, shades, size=(6, 4), names=None):
    folder.mkdir(parents=True)
    for name, shade in zip(
        names or [f"{k:02d}.png" for k in range(len(shades))], shades, strict=True
    ):
        Image.new("L", size, shade).save(folder / name)


def test_gifs_and_frame_folders_read_as_clips_in_frame_order(tmp_path):
    _gif(tmp_path / "a.gif", [0, 51, 255])
    # frames are read in name order, not in the order they were written
    _frames(tmp_path / "b", [255, 0, 102], names=["frame_2.png", "frame_0.png", "frame_1.png"])
    data = VideoFolder(tmp_path, channels=1)
    assert len(data) == 2 and data.num_classes == 0 and data.num_frames == 3
    gif, label = data[0]
    assert gif.shape == (3, 1, 4, 6) and label == 0
    expected = torch.tensor([0, 51, 255]) / 127.5 - 1
    assert torch.allclose(gif[:, 0, 0, 0], expected)
    assert torch.allclose(data[1][0][:, 0, 0, 0], torch.tensor([0, 102, 255]) / 127.5 - 1)
    rgb = VideoFolder(tmp_path)[1][0]
    assert rgb.shape == (3, 3, 4, 6) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_one_class_per_sub_folder_and_frames_resized(tmp_path):
    _gif(tmp_path / "cat" / "x.gif", [10, 20], size=(12, 8))
    _frames(tmp_path / "dog" / "y", [30, 40], size=(6, 4))
    _gif(tmp_path / "dog" / "z.gif", [50, 60], size=(6, 4))
    with pytest.raises(
        ValueError, match=r"different sizes \(12x8 in .*x.gif, 6x4 in .*y\).*--image-size"
    ):
        VideoFolder(tmp_path)
    data = VideoFolder(tmp_path, 4)
    assert data.classes == ["cat", "dog"] and data.labels == [0, 1, 1]
    assert [tuple(data[k][0].shape) for k in range(3)] == [(2, 3, 4, 4)] * 3
    assert open_dataset(str(tmp_path), image_size=4, video=True).num_classes == 2


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"a.gif": 2, "b.gif": 3}, r"different frame counts \(2 in .*a.gif, 3 in .*b.gif\)"),
        ({"a.gif": 2, "k/b.gif": 2}, r"one sub-folder per class.*depths \[1, 2\]"),
        ({"x.png": 1}, "holds frames at its top level"),
        ({"notes.txt": 0}, "no clips found under"),
        ({"k/clip.mp4": 0}, r"clip.mp4: .mp4 clips need a system codec.*ffmpeg -i clip.mp4"),
    ],
)
def test_unusable_clip_folders_are_named(tmp_path, layout, message):
    for name, frames in layout.items():
        path = tmp_path / name
        if path.suffix == ".gif":
            _gif(path, [40 * k for k in range(frames)])
        elif path.suffix == ".png":
            Image.new("L", (4, 4)).save(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0")
    with pytest.raises(ValueError, match=message):
        VideoFolder(tmp_path)


def test_a_missing_clip_folder_and_a_damaged_gif_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"clip folder {tmp_path / 'no'} does not exist"):
        VideoFolder(tmp_path / "no")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
    with pytest.raises(ValueError, match=r"cannot read clip .*bad.gif"):
        VideoFolder(tmp_path)


def _folded(start: int, velocity: int, frames: int, room: int) -> list[int]:
    """A straight path folded into [0, room] by reflection at both ends."""
    period = 2 * room
    return [room - abs(room - (start + velocity * t) % period) for t in range(frames)]


def test_moving_digits_bounce_along_straight_reflected_paths():
    data = MovingDigits("test", frames=12, size=12, clips_per_digit=2, seed=3)
    assert len(data) == 2 * len(data.digits) and data.positions.shape == (len(data), 12, 2)
    room = 12 - 8
    assert data.positions.min() >= 0 and data.positions.max() <= room
    for path in data.positions[:50]:
        for axis in (0, 1):
            track = path[:, axis].tolist()
            assert any(_folded(track[0], v, 12, room) == track for v in range(-2, 3)), (
                f"not a reflected straight path: {track}"
            )
        assert (path[1:] != path[:-1]).any(), "a clip that does not move"
    bounced = sum(len({int(d) for d in path[:, 0].diff()} - {0}) > 1 for path in data.positions)
    assert bounced > 0, "no clip bounced off an edge"


def test_moving_digits_draw_the_digit_where_its_path_says():
    data = MovingDigits("train", size=16, seed=1)
    for index in (0, 7, len(data.digits) + 3):
        clip, label = data[index]
        digit = index % len(data.digits)
        assert label == int(data.digit_labels[digit])
        for frame, (row, column) in zip(clip, data.positions[index].tolist(), strict=True):
            assert torch.equal(frame[0, row : row + 8, column : column + 8], data.digits[digit][0])
            frame[0, row : row + 8, column : column + 8] = -1
            assert (frame == -1).all(), "pixels drawn outside the digit's square"
    again = MovingDigits("train", size=16, seed=1)
    assert torch.equal(again.positions, data.positions)
    assert not torch.equal(MovingDigits("train", size=16, seed=2).positions, data.positions)
    with pytest.raises(ValueError, match="size must be at least 10"):
        MovingDigits(size=9)


def test_tensor_files_of_videos_and_latent_clips(tmp_path):
    pixels = torch.randint(0, 256, (3, 4, 1, 5, 5), dtype=torch.uint8)
    torch.save({"videos": pixels, "labels": torch.tensor([2, 0, 1])}, tmp_path / "v.pt")
    data = TensorFileDataset(tmp_path / "v.pt")
    clip, label = data[0]
    assert data.kind == "videos" and data.num_classes == 3 and label == 2
    assert torch.allclose(clip, pixels[0].float() / 127.5 - 1)
    assert clip.min() >= -1 and clip.max() <= 1
    torch.save({"latents": torch.randn(2, 4, 3, 5, 5)}, tmp_path / "z.pt")
    assert open_dataset(str(tmp_path / "z.pt"))[1][0].shape == (4, 3, 5, 5)


_CLIPS = torch.zeros(2, 3, 1, 4, 4)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"videos": torch.zeros(2, 1, 4, 4)},
            r"videos in .* must be a \(N, T, C, H, W\) tensor, got \(2, 1, 4, 4\)",
        ),
        ({"videos": _CLIPS.int()}, "must be floating point or uint8, got torch.int32"),
        ({"videos": _CLIPS[:0]}, "must not be empty"),
        (
            {"latents": torch.zeros(2, 4, 4)},
            r"latents in .* must be a \(N, C, H, W\) or \(N, T, C, H, W\) tensor",
        ),
        (
            {"latents": _CLIPS[:, 0], "videos": _CLIPS},
            r"exactly one of 'latents' and 'videos' \(found: latents, videos\)",
        ),
    ],
)
def test_unusable_tensor_files_are_named(tmp_path, tensors, message):
    path = tmp_path / "data.pt"
    torch.save(tensors, path)
    with pytest.raises(ValueError, match=message):
        TensorFileDataset(path)


def test_video_and_flips_are_refused_where_they_would_be_ignored(tmp_path):
    with pytest.raises(ValueError, match="video reads a folder as clips; the moving-digits"):
        open_dataset("moving-digits", video=True)
    _gif(tmp_path / "a.gif", [0, 9])
    with pytest.raises(ValueError, match="random_flip applies to image folders only; a clip"):
        open_dataset(str(tmp_path), video=True, random_flip=True)
    assert open_dataset("moving-digits", image_size=12)[0][0].shape == (8, 1, 12, 12)


def test_clips_are_written_as_frame_strips_and_an_animated_gif(tmp_path):
    clips = torch.rand(6, 4, 1, 5, 5) * 2 - 1
    strips, gif = save_clips(clips, tmp_path / "out" / "clips.png", columns=3, scale=2)
    assert gif == tmp_path / "out" / "clips.gif"
    assert Image.open(strips).size == (2 * (4 * 6 + 1), 2 * (6 * 6 + 1))
    with Image.open(gif) as movie:
        assert movie.n_frames == 4 and movie.size == (2 * (3 * 6 + 1), 2 * (2 * 6 + 1))
        movie.seek(2)
        shown = np.asarray(movie.convert("L"))[::2, ::2]
    assert np.array_equal(shown, image_grid(clips[:, 2], 3)[..., 0])


def test_train_resume_and_sample_clips_end_to_end(tmp_path, capsys):
    for k in range(4):
        _gif(tmp_path / "clips" / f"{k}.gif", [(40 * k + 60 * t) % 256 for t in range(3)], (8, 8))
    out = tmp_path / "run"
    tiny = [
        "--data", str(tmp_path / "clips"), "--video", "--batch-size", "2", "--model-arg",
        "dim=16", "--model-arg", "depth=3", "--model-arg", "patch_size=4", "--sample-steps", "1",
        "--grid-rows", "1", "--grid-columns", "2", "--no-progress", "--ckpt-every", "0",
        "--sample-every", "2", "--out-dir", str(out),
    ]  # fmt: skip
    assert main(["train", *tiny, "--steps", "2"]) == 0
    assert main(["train", *tiny, "--steps", "3", "--resume"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["video"] is True and config["model"]["num_frames"] == 3
    assert config["model"]["pattern"] == "video_sst"
    with Image.open(out / "samples" / "step_0000002.gif") as movie:
        assert movie.n_frames == 3
    args = ["sample", "--ckpt", str(out / "checkpoints" / "last.pt"), "--steps", "1"]
    raw = tmp_path / "raw.pt"
    assert (
        main([*args, "--num", "3", "--out", str(tmp_path / "s.png"), "--save-tensor", str(raw)])
        == 0
    )
    assert torch.load(raw, weights_only=True)["samples"].shape == (3, 3, 3, 8, 8)
    assert (tmp_path / "s.gif").is_file() and "wrote 3 clips" in capsys.readouterr().out
    without = [a for a in tiny if a != "--video"]
    assert main(["train", *without, "--steps", "4", "--resume"]) == 0  # the run's own --video
    with pytest.raises(SystemExit, match="--video"):
        main(["train", *without, "--no-video", "--steps", "5", "--resume"])


def test_motion_scores_tell_moving_clips_from_frozen_ones():
    assert video_demo.wasserstein_1d(
        torch.arange(10.0), torch.arange(10.0) + 0.25
    ) == pytest.approx(0.25)
    clip = torch.full((1, 2, 1, 6, 6), -1.0)
    clip[0, 0, 0, 1, 4] = clip[0, 1, 0, 3, 0] = 1
    assert video_demo.centre_of_mass(clip).tolist() == [[[1.0, 4.0], [3.0, 0.0]]]

    test = MovingDigits("test", clips_per_digit=1)
    train = MovingDigits("train", clips_per_digit=1)
    images, labels = video_demo._stack(train)
    classifier = video_demo.train_digit_classifier(
        images.flatten(0, 1), labels.repeat_interleave(8), epochs=2
    )
    real, real_labels = video_demo._stack(test, 100, generator_seed=5)
    moving = video_demo.score_clips(classifier, real, real_labels, test, train)
    frozen = video_demo.score_clips(
        classifier, real[:, :1].expand_as(real), real_labels, test, train
    )
    assert moving["frame_accuracy"] > 0.8 and frozen["speed_mean"] == 0
    assert moving["speed_distance"] < 0.5 * frozen["speed_distance"]
    assert moving["speed_mean"] == pytest.approx(moving["speed_mean_real"], rel=0.25)


def test_a_tiny_video_demo_writes_every_output(tmp_path, monkeypatch, capsys):
    # the scores' classifier is trained and checked above; an untrained one keeps this quick
    untrained = DigitClassifier(16)
    monkeypatch.setattr(video_demo, "_frame_classifier", lambda seed: (untrained, 0.0))
    args = [
        "demo", "--video", "--out-dir", str(tmp_path), "--steps", "2", "--dim", "16",
        "--depth", "3", "--sample-steps", "1", "--eval-per-class", "1", "--batch-size", "4",
        "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    for name in ("samples.png", "samples.gif", "orders.png", "loss.csv", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["model"]["patch_size"] == 4
    assert metrics["model"]["num_frames"] == 8 and 0 <= metrics["clip_accuracy"] <= 1
    with Image.open(tmp_path / "samples.gif") as movie:
        assert movie.n_frames == 8
    assert "clips with every frame right" in capsys.readouterr().out
