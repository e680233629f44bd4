"""Training data: image folders and scikit-learn's handwritten digits; ``open_dataset`` also
opens clips (:mod:`.videos`) and data files (:mod:`.tensor_files`).

Every dataset yields ``(x, label)`` with ``x`` a float tensor of shape (C, H, W) scaled to
``[-1, 1]`` (latents as stored) and has a ``num_classes`` attribute (0 when unlabelled).
Random flips are a deterministic function of ``(seed, epoch, index)``, so that a resumed or a
multi-process run flips exactly the images a single uninterrupted run would.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zigzag_mamba.ops.utils import check_fits_in_memory

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "image folders need Pillow: pip install pillow (or the train extra, "
            "pip install -e '.[train]' in a clone)"
        ) from exc
    return Image


#: The largest side ``--image-size`` takes (a 65536 x 65536 RGB image alone is 48 GiB of fp32).
MAX_IMAGE_SIZE = 16384


def check_image_size(size: object) -> None:
    """``size`` is None (keep the images' own) or an int from 1 to :data:`MAX_IMAGE_SIZE`."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size (--image-size) must be an int from 1 to {MAX_IMAGE_SIZE}, or none to "
            f"keep the images' size; got {size!r}"
        )


def check_labels(labels: object, count: int, where: str) -> int:
    """The number of classes of integer ``labels`` (count,), each >= 0, or an error naming
    ``where``; warns when there are more classes than samples."""
    if not isinstance(labels, Tensor) or labels.shape != (count,):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{where} must have shape ({count},), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{where} must be integer class ids, got {labels.dtype} values such as "
            f"{labels[:3].tolist()} (they would be truncated, not rounded)"
        )
    if count and int(labels.min()) < 0:
        bad = labels[labels < 0][:3].tolist()
        raise ValueError(f"{where} must be class ids >= 0, got {bad}")
    classes = int(labels.max()) + 1 if count else 0
    if classes > count:
        warnings.warn(
            f"{where}: the largest id, {classes - 1}, makes {classes} classes for {count} "
            "samples; a model needs a row per class, so check that these are class ids",
            RuntimeWarning,
            stacklevel=3,
        )
    return classes


# Pillow modes of more than 8 bits per channel, with the largest value each can hold.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def pillow_mode(channels: int) -> str:
    """The Pillow mode of images with ``channels`` channels: 3 (RGB) or 1 (greyscale)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return "RGB" if channels == 3 else "L"


def to_mode(image, mode: str, file: Path):
    """``image`` as ``mode`` ("RGB" or "L"), converting what Pillow's own ``convert`` would get
    wrong: 16-bit images are scaled to 8 bits (``convert`` clips them, so all but the darkest
    pixels turn white) and transparent pixels are laid over black. 32-bit integer and float
    images are refused, naming the file."""
    Image = _pillow()
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / _WIDE_MODES[image.mode])
        image = Image.fromarray(np.round(pixels).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        raise ValueError(
            f"image {file} is a 32-bit {'integer' if image.mode == 'I' else 'float'} image "
            f"(Pillow mode {image.mode!r}), which has no standard 8-bit reading; convert it to 8 "
            "or 16 bits per channel"
        )
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image.alpha_composite(rgba)
    return image.convert(mode)


class ImageFolder(Dataset):
    """Images under ``root``; one class per sub-folder, or unlabelled if they lie in ``root``.

    Args:
        root: a folder of images (searched recursively).
        size: resize the shorter side to ``size`` and centre-crop to ``size x size``. ``None``
            keeps the images as they are, which requires them all to have one size.
        channels: 3 (RGB) or 1 (greyscale).
        random_flip: flip left-right with probability 1/2, freshly each epoch.
        seed: seeds the flips.

    Example::

        >>> from PIL import Image
        >>> Path("photos/cats").mkdir(parents=True)
        >>> Image.new("RGB", (80, 60), "orange").save("photos/cats/tabby.png")
        >>> data = ImageFolder("photos/", size=32, random_flip=True)
        >>> x, label = data[0]
        >>> x.shape, label, data.classes
        (torch.Size([3, 32, 32]), 0, ['cats'])
    """

    def __init__(
        self,
        root: str | Path,
        size: int | None = None,
        *,
        channels: int = 3,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        check_image_size(size)
        self.root = Path(root)
        self.size = size
        self.mode = pillow_mode(channels)
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.files, labels, self.classes = _find_images(self.root)
        self.labels = labels
        self.num_classes = len(self.classes)
        self._check_readable_and_sized()

    def _check_readable_and_sized(self) -> None:
        Image = _pillow()
        sizes: dict[tuple[int, int], Path] = {}
        for file in self.files:
            try:
                with Image.open(file) as image:  # reads the header only
                    sizes.setdefault(image.size, file)
                    mode = image.mode
            except Exception as exc:
                raise ValueError(f"cannot read image {file}: {exc}") from exc
            if mode in ("I", "F"):
                to_mode(Image.new(mode, (1, 1)), self.mode, file)  # raises, naming the file
        if self.size is None and len(sizes) > 1:
            (a, file_a), (b, file_b) = list(sizes.items())[:2]
            raise ValueError(
                f"images under {self.root} have different sizes ({a[0]}x{a[1]} in {file_a}, "
                f"{b[0]}x{b[1]} in {file_b}); pass --image-size (or size= in Python) to "
                "resize and centre-crop them"
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of ``epoch`` (the trainer calls this at each epoch start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        Image = _pillow()
        file = self.files[index]
        try:
            with Image.open(file) as image:
                image = to_mode(image, self.mode, file)
                if self.size is not None:
                    image = _resize_and_crop(image, self.size)
                pixels = np.asarray(image, dtype=np.float32)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot read image {file}: {exc}") from exc
        x = torch.from_numpy(pixels / 127.5 - 1.0)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        if self.random_flip and self._flips(index):
            x = x.flip(-1)
        return x.contiguous(), self.labels[index]

    def _flips(self, index: int) -> bool:
        # A string seed is hashed the same way in every process (unlike hash()).
        return random.Random(f"{self.seed}:{self.epoch}:{index}").random() < 0.5


def _find_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if all(p.parent == root for p in files):
        return files, [0] * len(files), []
    if any(p.parent == root for p in files):
        raise ValueError(
            f"{root} mixes images at its top level with class sub-folders; use one or the other"
        )
    classes = sorted({p.relative_to(root).parts[0] for p in files})
    index = {name: i for i, name in enumerate(classes)}
    return files, [index[p.relative_to(root).parts[0]] for p in files], classes


def _resize_and_crop(image, size: int):
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), resample=_pillow().Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class DigitsDataset(Dataset):
    """The 1797 real 8x8 handwritten digits that scikit-learn ships (no download), 10 classes.

    Args:
        split: ``"train"``, ``"test"`` (a seeded, class-stratified ``holdout`` fraction) or
            ``"all"``.
        size: 8 keeps the native resolution; larger sizes upsample bilinearly.
        holdout: the fraction held out as the test split.
        seed: seeds the split.

    Example::

        >>> data = DigitsDataset("train")
        >>> x, label = data[0]
        >>> x.shape, data.num_classes
        (torch.Size([1, 8, 8]), 10)
    """

    num_classes = 10

    def __init__(
        self, split: str = "train", size: int = 8, *, holdout: float = 0.2, seed: int = 0
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        check_image_size(size)
        images, labels = load_digits_tensors(size)
        if split != "all":
            test = _stratified_holdout(labels, holdout, seed)
            keep = test if split == "test" else ~test
            images, labels = images[keep], labels[keep]
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def load_digits_tensors(size: int = 8) -> tuple[Tensor, Tensor]:
    """All digits as ``(images (N, 1, size, size) in [-1, 1], labels (N,))``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits data set needs scikit-learn: pip install scikit-learn (or the train "
            "extra, pip install -e '.[train]' in a clone)"
        ) from exc
    digits = load_digits()
    check_fits_in_memory(4 * len(digits.images) * size * size, f"the digits at {size}x{size}")
    images = torch.from_numpy(digits.images).float()[:, None] / 8.0 - 1.0  # pixels are 0..16
    if size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        )
    return images, torch.from_numpy(digits.target).long()


def _stratified_holdout(labels: Tensor, fraction: float, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test[members[: round(fraction * len(members))]] = True
    return test


def open_dataset(
    source: str,
    *,
    image_size: int | None = None,
    random_flip: bool = False,
    video: bool = False,
    seed: int = 0,
) -> Dataset:
    """Build a dataset from a short description, as the CLI does.

    ``"digits"`` (scikit-learn's digits, train split; ``image_size`` defaults to 8),
    ``"moving-digits"`` (clips of them moving, train split; the canvas ``image_size`` defaults to
    16), a folder of images (with ``video``, a folder of clips: see
    :class:`~zigzag_mamba.train.videos.VideoFolder`), or a ``.pt``/``.safetensors`` data file
    (:class:`~zigzag_mamba.train.tensor_files.TensorFileDataset`). ``random_flip`` applies to
    image folders only and ``video`` to folders only: asked for other data, each is refused
    rather than silently ignored.

    Example::

        >>> len(open_dataset("digits"))
        1438
    """
    from zigzag_mamba.train import tensor_files, videos

    check_image_size(image_size)
    path = Path(source)
    if source in ("digits", "moving-digits"):
        kind = f"the {source}"
    elif path.is_dir():
        kind = "a clip folder" if video else "an image folder"
    elif path.suffix in (".pt", ".pth", ".safetensors"):
        kind = "a data file"
    else:
        raise FileNotFoundError(
            f"data source {source!r} is not 'digits', 'moving-digits', a folder, or a "
            ".pt/.safetensors data file"
        )
    if random_flip and kind != "an image folder":
        raise ValueError(
            f"random_flip applies to image folders only; {kind} ({source!r}) would not be flipped"
        )
    if video and not path.is_dir():
        raise ValueError(
            f"video reads a folder as clips; {kind} ({source!r}) is no folder (data files and "
            "moving-digits say themselves whether they hold clips)"
        )
    if kind == "an image folder":
        return ImageFolder(path, image_size, random_flip=random_flip, seed=seed)
    if kind == "a clip folder":
        return videos.VideoFolder(path, image_size)
    if kind == "a data file":
        return tensor_files.TensorFileDataset(path)
    if source == "moving-digits":
        size = 16 if image_size is None else image_size
        return videos.MovingDigits("train", size=size, seed=seed)
    return DigitsDataset("train", 8 if image_size is None else image_size, seed=seed)
