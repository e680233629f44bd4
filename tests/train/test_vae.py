import json

import numpy as np
import pytest
import torch
from PIL import Image

from zigzag_mamba.cli import main
from zigzag_mamba.train.tensor_files import TensorFileDataset

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

from zigzag_mamba.train.vae import LatentCodec, encode_folder  # noqa: E402


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A tiny randomly initialised AutoencoderKL, saved as from_pretrained reads one: 3 -> 4
    channels, each side halved once; a scaling and a shift that are not 1 and 0."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def _photos(root, sizes=((20, 16),) * 3):
    for k, size in enumerate(sizes):
        label = "warm" if k % 2 else "cool"
        (root / label).mkdir(parents=True, exist_ok=True)
        colour = (40 * k, 200 - 30 * k, 90)
        Image.new("RGB", size, colour).save(root / label / f"{k}.png")
    return root


def test_latents_are_the_scaled_encoder_means_and_decode_back(vae_folder, tmp_path):
    codec = LatentCodec.load(str(vae_folder))
    assert codec.scaling == (0.5, 0.25) and codec.downsampling == 2
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = codec.vae.encode(images).latent_dist.mean
        decoded = codec.vae.decode(mean).sample.clamp(-1, 1)
    latents = codec.encode(images)
    torch.testing.assert_close(latents, (mean - 0.25) * 0.5)
    torch.testing.assert_close(codec.decode(latents), decoded)
    clips = latents[None].expand(3, -1, -1, -1, -1)  # (B, T, C, h, w): frame by frame
    torch.testing.assert_close(codec.decode(clips)[2], decoded)


def test_encode_writes_latents_labels_and_their_scaling(vae_folder, tmp_path):
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(photos), str(out), "--vae", str(vae_folder), "--image-size", "8",
                 "--batch-size", "2", "--no-progress"]) == 0  # fmt: skip
    stored = load_file(str(out))
    assert stored["latents"].shape == (3, 4, 4, 4) and stored["labels"].tolist() == [0, 0, 1]
    assert float(stored["scaling_factor"]) == 0.5 and float(stored["shift_factor"]) == 0.25
    data = TensorFileDataset(out)
    assert data.scaling == (0.5, 0.25) and data.num_classes == 2
    codec = LatentCodec.load(str(vae_folder))
    first = np.asarray(Image.open(photos / "cool" / "0.png").resize((8, 8)), dtype=np.float32)
    image = torch.from_numpy(first).permute(2, 0, 1)[None] / 127.5 - 1
    torch.testing.assert_close(data[0][0], codec.encode(image)[0], atol=1e-5, rtol=1e-5)
    pt = encode_folder(photos, tmp_path / "z.pt", codec, image_size=8, progress=False)
    torch.testing.assert_close(TensorFileDataset(pt).tensors, data.tensors)


def test_encode_train_and_sample_decode_with_the_vae(vae_folder, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    latents = tmp_path / "z.safetensors"
    vae = ["--vae", str(vae_folder)]
    assert main(["encode", str(photos), str(latents), *vae, "--image-size", "8",
                 "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "run"
    train = [
        "train", "--data", str(latents), *vae, "--batch-size", "2", "--steps", "2",
        "--model-arg", "dim=16", "--model-arg", "depth=2", "--model-arg", "patch_size=1",
        "--sample-steps", "1", "--grid-rows", "2", "--grid-columns", "2", "--no-progress",
        "--ckpt-every", "0", "--out-dir", str(out),
    ]  # fmt: skip
    assert main(train) == 0
    # decoded: an RGB grid of 8x8 images (scaled 8 times), not 4 grey panels of 4x4 latents
    grid = Image.open(out / "samples" / "step_0000002.png")
    assert grid.mode == "RGB" and grid.size == (8 * (2 * 9 + 1), 8 * (2 * 9 + 1))
    assert json.loads((out / "config.json").read_text())["vae"] == str(vae_folder)
    sample = ["sample", "--ckpt", str(out / "checkpoints" / "last.pt"), "--steps", "1"]
    raw = tmp_path / "raw.pt"
    png = tmp_path / "s.png"
    assert main([*sample, "--num", "2", "--columns", "2", "--out", str(png),
                 "--save-tensor", str(raw)]) == 0  # fmt: skip
    assert Image.open(png).mode == "RGB" and Image.open(png).size == (8 * 19, 8 * 10)
    assert torch.load(raw, weights_only=True)["samples"].shape == (2, 4, 4, 4)  # the latents


def test_a_vae_that_does_not_fit_the_data_is_named_before_training(vae_folder, tmp_path):
    unscaled = tmp_path / "plain.pt"
    torch.save({"latents": torch.randn(4, 4, 4, 4)}, unscaled)
    other = tmp_path / "other.pt"
    torch.save({"latents": torch.randn(4, 4, 4, 4), "scaling_factor": torch.tensor(0.18215)}, other)
    grey = tmp_path / "grey.pt"
    torch.save({"latents": torch.randn(4, 1, 4, 4), "scaling_factor": torch.tensor(0.5),
                "shift_factor": torch.tensor(0.25)}, grey)  # fmt: skip
    base = ["train", "--vae", str(vae_folder), "--steps", "1", "--batch-size", "2",
            "--no-progress", "--out-dir"]  # fmt: skip
    for data, message in (
        (unscaled, "records no latent scaling"),
        (other, r"shift_factor\) \(0.18215, 0\), this VAE with \(0.5, 0.25\); encode"),
        (grey, "has 1-channel latents, this VAE 4"),
    ):  # fmt: skip
        out = tmp_path / data.stem
        with pytest.raises(SystemExit, match=message):
            main([*base, str(out), "--data", str(data)])
        assert not (out / "config.json").exists()
    with pytest.raises(
        SystemExit, match=r"--vae '.*nowhere': cannot load a diffusers AutoencoderKL"
    ):
        main(
            [
                *base,
                str(tmp_path / "x"),
                "--data",
                str(unscaled),
                "--vae",
                str(tmp_path / "nowhere"),
            ]
        )


def test_encode_names_sizes_the_vae_cannot_take_and_bad_outputs(vae_folder, tmp_path):
    photos = _photos(tmp_path / "photos", sizes=((9, 9),))
    with pytest.raises(
        SystemExit, match=r"are 9x9; the VAE shrinks each side 2 times.*--image-size \(e.g. 8\)"
    ):
        main(["encode", str(photos), str(tmp_path / "z.pt"), "--vae", str(vae_folder)])
    with pytest.raises(SystemExit, match=r"z.npy must end in .safetensors or .pt"):
        main(["encode", str(photos), str(tmp_path / "z.npy"), "--vae", str(vae_folder)])
    assert not (tmp_path / "z.pt").exists()
