"""Training clips: folders of frames or animated GIFs, and moving digits made on the fly.

Every dataset yields ``(x, label)`` with ``x`` a float tensor of shape (T, C, H, W) in
``[-1, 1]`` and has a ``num_classes`` attribute (0 when unlabelled), as the image datasets of
:mod:`zigzag_mamba.train.data` do. Clips are read with Pillow, which decodes GIFs itself; MP4
and other codec-compressed files are refused (they would need a system codec): convert them to
frames first, e.g. ``ffmpeg -i clip.mp4 clip/%04d.png``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zigzag_mamba.train.data import (
    IMAGE_EXTENSIONS,
    _pillow,
    _resize_and_crop,
    _stratified_holdout,
    check_image_size,
    load_digits_tensors,
    pillow_mode,
    to_mode,
)

#: Files read as one clip each (every other image is a frame of a folder clip).
CLIP_EXTENSIONS = (".gif",)
#: Files refused with advice to convert them to frames.
CODEC_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_FRAME_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e not in CLIP_EXTENSIONS)


class VideoFolder(Dataset):
    """Clips under ``root``: each an animated GIF or a folder of frames (read in file-name
    order); one class per sub-folder of ``root``, or unlabelled if the clips lie in ``root``.

    Every clip must have the same number of frames, and without ``size`` the same frame size.

    Args:
        root: the folder of clips.
        size: resize each frame's shorter side to ``size`` and centre-crop it to
            ``size x size``; ``None`` keeps the frames as they are.
        channels: 3 (RGB) or 1 (greyscale).

    Example::

        >>> from PIL import Image
        >>> frames = [Image.new("L", (16, 16), shade) for shade in (0, 128, 255)]
        >>> Path("clips").mkdir()
        >>> frames[0].save("clips/fade.gif", save_all=True, append_images=frames[1:])
        >>> x, label = VideoFolder("clips", channels=1)[0]
        >>> x.shape, label
        (torch.Size([3, 1, 16, 16]), 0)
    """

    def __init__(self, root: str | Path, size: int | None = None, *, channels: int = 3) -> None:
        check_image_size(size)
        self.root = Path(root)
        self.size = size
        self.mode = pillow_mode(channels)
        self.clips, self.labels, self.classes = _find_clips(self.root)
        self.num_classes = len(self.classes)
        self.num_frames = self._check_clips()

    def _check_clips(self) -> int:
        """The clips' common frame count, or an error naming two clips that differ (in frames,
        or without ``size`` in frame size)."""
        seen: dict[int, Path] = {}
        sizes: dict[tuple[int, int], Path] = {}
        for clip in self.clips:
            count, frame_sizes = _clip_header(clip)
            seen.setdefault(count, clip)
            for frame_size in frame_sizes:
                sizes.setdefault(frame_size, clip)
        if len(seen) > 1:
            (a, clip_a), (b, clip_b) = list(seen.items())[:2]
            raise ValueError(
                f"clips under {self.root} have different frame counts ({a} in {clip_a}, {b} in "
                f"{clip_b}); every clip needs the same number of frames"
            )
        if self.size is None and len(sizes) > 1:
            (a, clip_a), (b, clip_b) = list(sizes.items())[:2]
            raise ValueError(
                f"frames under {self.root} have different sizes ({a[0]}x{a[1]} in {clip_a}, "
                f"{b[0]}x{b[1]} in {clip_b}); pass --image-size (or size= in Python) to resize "
                "and centre-crop them"
            )
        return next(iter(seen))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        clip = self.clips[index]
        frames = [self._pixels(frame, clip) for frame in _read_frames(clip)]
        x = torch.from_numpy(np.stack(frames) / 127.5 - 1.0).float()
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), self.labels[index]

    def _pixels(self, frame, clip: Path) -> np.ndarray:
        frame = to_mode(frame, self.mode, clip)
        if self.size is not None:
            frame = _resize_and_crop(frame, self.size)
        return np.asarray(frame, dtype=np.float32)


def _find_clips(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """The clips under ``root`` (GIF files and folders of frames), their labels and classes."""
    if not root.is_dir():
        raise FileNotFoundError(f"clip folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        if file.suffix.lower() in CODEC_EXTENSIONS:
            raise ValueError(
                f"{file}: {file.suffix} clips need a system codec, which is not used here; "
                f"convert it to a folder of frames (ffmpeg -i {file.name} "
                f"{file.stem}/%04d.png) or to a GIF"
            )
    clips = [p for p in files if p.suffix.lower() in CLIP_EXTENSIONS]
    clips += sorted({p.parent for p in files if p.suffix.lower() in _FRAME_EXTENSIONS})
    clips.sort()
    if not clips:
        raise ValueError(
            f"no clips found under {root} (looked for {', '.join(CLIP_EXTENSIONS)} files and "
            f"folders of {', '.join(_FRAME_EXTENSIONS)} frames)"
        )
    if root in clips:
        raise ValueError(
            f"{root} holds frames at its top level; put each clip's frames in its own folder"
        )
    depths = {len(p.relative_to(root).parts) for p in clips}
    if depths == {1}:
        return clips, [0] * len(clips), []
    if depths != {2}:
        raise ValueError(
            f"clips under {root} must lie either in it or in one sub-folder per class, one level "
            f"down; found clips at depths {sorted(depths)}"
        )
    classes = sorted({p.relative_to(root).parts[0] for p in clips})
    index = {name: i for i, name in enumerate(classes)}
    return clips, [index[p.relative_to(root).parts[0]] for p in clips], classes


def _frame_files(clip: Path) -> list[Path]:
    return sorted(p for p in clip.iterdir() if p.suffix.lower() in _FRAME_EXTENSIONS)


def _clip_header(clip: Path) -> tuple[int, set[tuple[int, int]]]:
    """A clip's frame count and frame sizes, from the files' headers."""
    Image = _pillow()
    try:
        if clip.is_file():
            with Image.open(clip) as image:
                return getattr(image, "n_frames", 1), {image.size}
        files = _frame_files(clip)
        sizes = set()
        for file in files:
            with Image.open(file) as image:
                sizes.add(image.size)
        return len(files), sizes
    except Exception as exc:
        raise ValueError(f"cannot read clip {clip}: {exc}") from exc


def _read_frames(clip: Path) -> list:
    Image = _pillow()
    try:
        if clip.is_dir():
            frames = []
            for file in _frame_files(clip):
                with Image.open(file) as image:
                    image.load()
                    frames.append(image.copy())
            return frames
        with Image.open(clip) as image:
            frames = []
            for k in range(getattr(image, "n_frames", 1)):
                image.seek(k)
                frames.append(image.convert("RGBA"))  # each frame whole, transparency kept
            return frames
    except Exception as exc:
        raise ValueError(f"cannot read clip {clip}: {exc}") from exc


class MovingDigits(Dataset):
    """Clips of one real handwritten digit (scikit-learn's 8x8 digits, no download) moving
    over a blank ``size x size`` canvas at a constant speed and bouncing off its edges; labelled
    by the digit, 10 classes.

    Clip ``i`` shows digit ``i % n`` of the split (``n`` digits), so each digit appears in
    ``clips_per_digit`` clips, each with its own start and velocity: integers, seeded by
    ``(seed, i)``, each axis's velocity from -2 to 2 pixels a frame and not both 0.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``, the digits' split of
            :class:`~zigzag_mamba.train.data.DigitsDataset`.
        frames: frames per clip (T).
        size: the canvas side, at least 10.
        clips_per_digit: clips made from each digit.
        seed: seeds the split and the motion.

    Example::

        >>> data = MovingDigits("train")
        >>> x, label = data[0]
        >>> x.shape, data.num_classes, tuple(data.positions.shape)
        (torch.Size([8, 1, 16, 16]), 10, (5752, 8, 2))
    """

    num_classes = 10

    def __init__(
        self,
        split: str = "train",
        *,
        frames: int = 8,
        size: int = 16,
        clips_per_digit: int = 4,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        if size < 10:
            raise ValueError(
                f"size must be at least 10 (an 8x8 digit and room to move), got {size}"
            )
        images, labels = load_digits_tensors(8)
        if split != "all":
            test = _stratified_holdout(labels, 0.2, seed)
            keep = test if split == "test" else ~test
            images, labels = images[keep], labels[keep]
        self.digits, self.digit_labels = images, labels
        self.size = size
        count = len(labels) * clips_per_digit
        #: (N, T, 2): the top-left corner (row, column) of the digit in every frame.
        self.positions = torch.stack(
            [_bouncing_path(random.Random(f"{seed}:{i}"), frames, size - 8) for i in range(count)]
        )

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        digit = index % len(self.digits)
        path = self.positions[index]
        clip = torch.full((len(path), 1, self.size, self.size), -1.0)
        for frame, (row, column) in zip(clip, path.tolist(), strict=True):
            frame[:, row : row + 8, column : column + 8] = self.digits[digit]
        return clip, int(self.digit_labels[digit])


def _bouncing_path(rng: random.Random, frames: int, room: int) -> Tensor:
    """(frames, 2) integer positions in ``[0, room]``, moving at a random constant velocity and
    reflected at both ends of each axis."""
    velocity = [0, 0]
    while velocity == [0, 0]:
        velocity = [rng.randint(-2, 2), rng.randint(-2, 2)]
    position = [rng.randint(0, room), rng.randint(0, room)]
    path = []
    for _ in range(frames):
        path.append(list(position))
        for axis in (0, 1):
            step = position[axis] + velocity[axis]
            if not 0 <= step <= room:  # bounce: reflect off the edge it crossed
                step = -step if step < 0 else 2 * room - step
                velocity[axis] = -velocity[axis]
            position[axis] = step
    return torch.tensor(path, dtype=torch.long)
