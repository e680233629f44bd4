import numpy as np
import pytest
import torch
from PIL import Image

from zigzag_mamba.train.data import (
    DigitsDataset,
    ImageFolder,
    load_digits_tensors,
    open_dataset,
)
from zigzag_mamba.train.loader import BatchStream, Shard
from zigzag_mamba.train.tensor_files import TensorFileDataset


def _write(path, size=(6, 4), value=200, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[:, 0] = 0  # a dark left column, to see flips
    Image.fromarray(pixels).convert(mode).save(path)


def test_image_folder_classes_scaling_and_centre_crop(tmp_path):
    _write(tmp_path / "cats" / "a.png", (12, 8))
    _write(tmp_path / "dogs" / "b.jpg", (8, 16))
    data = ImageFolder(tmp_path, size=4)
    assert data.classes == ["cats", "dogs"] and data.num_classes == 2
    x, label = data[0]
    assert x.shape == (3, 4, 4) and label == 0
    assert x.min() >= -1 and x.max() <= 1
    assert data[1][1] == 1
    gray = ImageFolder(tmp_path, size=4, channels=1)
    assert gray[0][0].shape == (1, 4, 4)


def test_unlabelled_folder_keeps_native_size(tmp_path):
    for name in "abc":
        _write(tmp_path / f"{name}.png", (6, 4))
    data = ImageFolder(tmp_path)
    assert data.num_classes == 0 and len(data) == 3
    x, label = data[2]
    assert x.shape == (3, 4, 6) and label == 0
    assert x[:, :, 0].eq(-1).all() and x[:, :, 1:].gt(0).all()


def test_flips_are_deterministic_per_epoch_and_index(tmp_path):
    for i in range(16):
        _write(tmp_path / f"{i:02d}.png")
    data = ImageFolder(tmp_path, random_flip=True, seed=3)
    flipped = lambda: [bool(data[i][0][:, :, -1].eq(-1).all()) for i in range(16)]
    first = flipped()
    assert first == flipped() and 0 < sum(first) < 16
    data.set_epoch(1)
    assert flipped() != first
    assert not any(bool(ImageFolder(tmp_path)[i][0][:, :, -1].eq(-1).all()) for i in range(16))


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        ImageFolder(tmp_path / "empty")
    bad = tmp_path / "bad"
    _write(bad / "good.png")
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        ImageFolder(bad)
    mixed = tmp_path / "mixed"
    _write(mixed / "a.png", (6, 4))
    _write(mixed / "b.png", (5, 5))
    with pytest.raises(
        ValueError, match=r"different sizes.*pass --image-size \(or size= in Python\)"
    ):
        ImageFolder(mixed)
    assert ImageFolder(mixed, size=4)[1][0].shape == (3, 4, 4)


def test_digits_are_the_real_scikit_learn_digits():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and labels.bincount().tolist()[0] == 178
    assert images.min() == -1 and images.max() == 1
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) + len(test) == 1797 and len(test) == pytest.approx(0.2 * 1797, abs=10)
    # stratified: every class is in both splits in proportion
    assert (test.labels.bincount() - 0.2 * labels.bincount()).abs().max() <= 1
    train_set = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in train_set for x in test.images[:50])
    assert DigitsDataset("all", size=16)[0][0].shape == (1, 16, 16)


def test_latent_files(tmp_path):
    torch.save(
        {"latents": torch.ones(5, 4, 2, 2), "labels": torch.tensor([0, 1, 2, 1, 0])},
        tmp_path / "z.pt",
    )
    data = TensorFileDataset(tmp_path / "z.pt", scale=0.5)
    assert len(data) == 5 and data.num_classes == 3
    x, label = data[1]
    assert torch.equal(x, torch.full((4, 2, 2), 0.5)) and label == 1
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(3, 4, 2, 2)}, str(tmp_path / "z.safetensors"))
    assert open_dataset(str(tmp_path / "z.safetensors")).num_classes == 0
    torch.save({"images": torch.ones(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"one of 'latents' and 'videos' \(found: images\)"):
        TensorFileDataset(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="not 'digits'"):
        open_dataset(str(tmp_path / "nothing"))


def test_random_flip_is_refused_where_it_would_do_nothing(tmp_path):
    torch.save({"latents": torch.ones(2, 4, 2, 2)}, tmp_path / "z.pt")
    for source, kind in (("digits", "the digits"), (str(tmp_path / "z.pt"), "a data file")):
        with pytest.raises(ValueError, match=f"random_flip applies to image folders only; {kind}"):
            open_dataset(source, random_flip=True)
    assert len(open_dataset(str(tmp_path / "z.pt"))) == 2


def test_batch_stream_shards_the_single_process_batches():
    data = DigitsDataset("test")
    single = BatchStream(data, 8, seed=1)
    halves = [BatchStream(data, 4, seed=1, shard=Shard(r, 2)) for r in range(2)]
    for _ in range(single.per_epoch + 3):  # across an epoch boundary
        x, _ = next(single)
        parts = [next(h)[0] for h in halves]
        assert torch.equal(x[0::2], parts[0]) and torch.equal(x[1::2], parts[1])


def test_batch_stream_resumes_mid_epoch():
    data = DigitsDataset("test")
    straight = BatchStream(data, 16, seed=2)
    batches = [next(straight)[1] for _ in range(30)]
    first = BatchStream(data, 16, seed=2)
    for _ in range(13):
        next(first)
    resumed = BatchStream(data, 16, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(next(resumed)[1], b) for b in batches[13:])
    with pytest.raises(ValueError, match="lower the batch size"):
        BatchStream(data, 1000)
