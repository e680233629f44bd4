"""Crops of real photographs that ship inside scikit-learn: natural images with no download.

scikit-learn bundles two 427x640 colour photographs (``sklearn.datasets.load_sample_images``:
a temple by a lake and a dahlia). :class:`PhotoCrops` cuts small square crops from them, with
the evaluation crops taken from tiles that training never sees.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


def load_photos(scale: int = 4) -> Tensor:
    """Both photographs as (2, 3, H, W) in ``[-1, 1]``, shrunk ``scale`` times by area averaging.

    Example::

        >>> load_photos(4).shape
        torch.Size([2, 3, 106, 160])
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError(
            "the photos need scikit-learn: pip install scikit-learn (or the train extra, "
            "pip install -e '.[train]' in a clone)"
        ) from exc
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    images = load_sample_images().images  # read-only arrays: copy before wrapping
    pixels = torch.stack([torch.from_numpy(image.copy()) for image in images])
    photos = pixels.permute(0, 3, 1, 2).double() / 127.5 - 1.0
    # Area averaging is exact and deterministic (no interpolation kernel to choose).
    return torch.nn.functional.avg_pool2d(photos, scale).float()


class PhotoCrops(Dataset):
    """Square crops of scikit-learn's two sample photographs, unlabelled, in ``[-1, 1]``.

    The split: each photo (shrunk ``scale`` times) is cut into square tiles of ``tile`` pixels
    (1.5 crops wide by default), and the tiles on every fourth diagonal (row + column divisible
    by 4: a fifth of each photo) are held out. Evaluation crops lie wholly inside a held-out
    tile; training crops never touch one, so no evaluation pixel is ever seen in training.
    Spreading the held-out tiles over the whole of both photos puts parts of the temple, the
    trees, the sky, the lake, the dahlia and its background among them, not one region alone.

    - ``split="train"``: ``count`` crops at positions drawn uniformly from all crops that
      touch no held-out tile, each flipped left-right with probability 1/2, fixed by ``seed``.
    - ``split="eval"``: every crop inside a held-out tile on a grid of step ``stride``, in a
      fixed order (no randomness, so every run is scored on the same images).

    Args:
        split: ``"train"`` or ``"eval"``.
        size: the side of a crop in pixels (after shrinking).
        scale: how many times the 427x640 photos are shrunk (area averaging) before cropping.
        tile: the side of the tiles that are held out or not (default ``size * 3 // 2``).
        count: the number of training crops.
        stride: the step of the evaluation grid.
        seed: fixes the training crops' positions and flips.

    Example::

        >>> train, test = PhotoCrops("train", seed=0), PhotoCrops("eval")
        >>> x, label = train[0]
        >>> x.shape, label, len(test)
        (torch.Size([3, 16, 16]), 0, 300)
    """

    num_classes = 0

    def __init__(
        self,
        split: str = "train",
        size: int = 16,
        *,
        scale: int = 4,
        tile: int | None = None,
        count: int = 32768,
        stride: int = 2,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.photos = load_photos(scale)
        self.size, self.tile = size, tile or size * 3 // 2
        height, width = self.photos.shape[-2:]
        if self.tile < size or 4 * self.tile > min(height, width):
            raise ValueError(
                f"{size}x{size} crops need held-out tiles of {size} to {min(height, width) // 4} "
                f"pixels in the {height}x{width} photos (shrunk {scale} times), got {self.tile}; "
                "use smaller crops or a smaller scale"
            )
        self.held_out = held_out_mask(height, width, self.tile)
        if split == "train":
            corners = self._training_corners()
            g = torch.Generator().manual_seed(seed)
            self.corners = corners[torch.randint(len(corners), (count,), generator=g)]
            self.flips = torch.rand(count, generator=g) < 0.5
        else:
            self.corners = self._eval_corners(stride)
            self.flips = torch.zeros(len(self.corners), dtype=torch.bool)

    def _training_corners(self) -> Tensor:
        """(photo, top, left) of every crop that touches no held-out pixel."""
        touched = _window_sums(self.held_out, self.size) > 0
        tops, lefts = (~touched).nonzero(as_tuple=True)
        return _both_photos(tops, lefts)

    def _eval_corners(self, stride: int) -> Tensor:
        """(photo, top, left) of the crops inside a held-out tile, on a grid of step ``stride``."""
        tops, lefts = [], []
        rows, columns = self.held_out.shape[0] // self.tile, self.held_out.shape[1] // self.tile
        inside = torch.arange(0, self.tile - self.size + 1, stride)
        for row in range(rows):
            for column in range(columns):
                if (row + column) % HOLDOUT_EVERY == 0:
                    top, left = torch.meshgrid(inside, inside, indexing="ij")
                    tops.append(top.flatten() + row * self.tile)
                    lefts.append(left.flatten() + column * self.tile)
        return _both_photos(torch.cat(tops), torch.cat(lefts))

    def __len__(self) -> int:
        return len(self.corners)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        photo, top, left = self.corners[index].tolist()
        crop = self.photos[photo, :, top : top + self.size, left : left + self.size]
        return (crop.flip(-1) if self.flips[index] else crop).contiguous(), 0

    def images(self) -> Tensor:
        """Every crop at once, (N, 3, size, size)."""
        return torch.stack([self[i][0] for i in range(len(self))])


#: Tiles with (row + column) divisible by this are held out.
HOLDOUT_EVERY = 4


def held_out_mask(height: int, width: int, tile: int) -> Tensor:
    """(H, W) booleans, True on the held-out tiles (only whole tiles are ever held out)."""
    row = torch.arange(height) // tile
    column = torch.arange(width) // tile
    whole = (row < height // tile)[:, None] & (column < width // tile)[None, :]
    return whole & ((row[:, None] + column[None, :]) % HOLDOUT_EVERY == 0)


def _window_sums(mask: Tensor, size: int) -> Tensor:
    """For every top-left corner, how many True cells a ``size`` x ``size`` window covers."""
    counts = torch.nn.functional.avg_pool2d(mask[None, None].double(), size, stride=1) * size**2
    return counts[0, 0].round().long()


def _both_photos(tops: Tensor, lefts: Tensor) -> Tensor:
    """(photo, top, left) rows: every given corner in photo 0, then in photo 1."""
    corners = torch.stack([tops, lefts], dim=1)
    photo = torch.arange(2).repeat_interleave(len(corners))[:, None]
    return torch.cat([photo, corners.repeat(2, 1)], dim=1)
