"""Sample grids: one class a row, and every channel shown, never as transparency."""

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import TinyData, TinyNet, tiny_config

from zigzag_mamba.train.images import channel_panels, image_grid, save_grid
from zigzag_mamba.train.trainer import MAX_CLASS_ROWS, Trainer


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB"), (4, "L"), (2, "L")])
def test_grids_are_grey_or_rgb_never_rgba(tmp_path, channels, mode):
    images = torch.rand(6, channels, 5, 7) * 2 - 1
    picture = Image.open(save_grid(images, tmp_path / "grid.png", columns=3))
    assert picture.mode == mode
    tile_width = 7 if channels in (1, 3) else channels * 7 + channels - 1
    assert picture.size == (3 * (tile_width + 1) + 1, 2 * (5 + 1) + 1)


def test_each_channel_of_a_latent_is_its_own_panel():
    latents = torch.linspace(-1, 1, 4).view(1, 4, 1, 1).expand(2, 4, 3, 2).contiguous()
    panels = channel_panels(latents)
    assert panels.shape == (2, 1, 3, 4 * 2 + 3)
    row = panels[0, 0, 0].tolist()
    assert row[0:2] == [-1.0, -1.0] and row[3:5] == pytest.approx([-1 / 3] * 2)
    assert row[9:11] == [1.0, 1.0] and row[2] == row[5] == row[8] == 0.0  # grey separators
    grid = image_grid(latents, columns=2)
    assert grid.shape[-1] == 1 and np.unique(grid[1:4, 1:3]).tolist() == [0]  # channel 0: black


def _trainer(tmp_path, data, **overrides):
    torch.manual_seed(0)
    config = tiny_config(tmp_path, steps=1, **overrides)
    return Trainer(TinyNet(num_classes=max(1, data.num_classes)), data, config)


class Unlabelled(TinyData):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 0


@pytest.mark.parametrize(
    ("labelled", "grid_rows", "rows"), [(True, 0, 4), (True, 6, 6), (False, 0, 8), (False, 3, 3)]
)
def test_sample_grids_have_one_row_per_class(tmp_path, labelled, grid_rows, rows):
    data = TinyData() if labelled else Unlabelled()
    trainer = _trainer(tmp_path, data, grid_rows=grid_rows, grid_columns=5)
    assert trainer.grid_rows() == rows
    picture = Image.open(trainer.sample_grid())
    scale = 64 // 4
    assert picture.size == (scale * (5 * 5 + 1), scale * (rows * 5 + 1))
    _, labels = trainer.sample(rows * 5)
    if data.num_classes:
        assert labels.view(rows, 5).tolist() == [[i % 4] * 5 for i in range(rows)]
    else:
        assert labels is None


def test_many_classes_show_the_first_ones_a_row_each(tmp_path):
    class Many(TinyData):
        num_classes = 40

    trainer = _trainer(tmp_path, Many(), grid_rows=0)
    assert trainer.grid_rows() == MAX_CLASS_ROWS == 16
