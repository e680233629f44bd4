import sys

import numpy as np
import pytest
from PIL import Image

from zigzag_mamba import cli
from zigzag_mamba.viz import draw_orders, draw_strategies


def test_draw_orders_writes_a_png(tmp_path):
    path = draw_orders("hilbert8", (5, 7), tmp_path / "sub" / "orders.png")
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 10  # something was drawn, not a blank canvas


def test_draw_strategies_draws_one_row_per_strategy(tmp_path):
    image = np.asarray(Image.open(draw_strategies((4, 6), tmp_path / "s.png")).convert("L"))
    # Three rows of panels: the picture is taller than one row and wider than it is tall.
    assert image.shape[0] > 200 and image.shape[1] > image.shape[0] and image.std() > 10


def test_cli_orders_writes_the_file(tmp_path, capsys):
    out = tmp_path / "z.png"
    assert cli.main(["orders", "--pattern", "zigzag8", "--grid", "8", "8", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_cli_lists_patterns(capsys):
    assert cli.main(["orders", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "zigzag8" in names and "hilbert8" in names


def test_video_patterns_draw_one_panel_per_layer(tmp_path, monkeypatch):
    import zigzag_mamba.viz as viz

    drawn = []
    real = viz._draw_order
    monkeypatch.setattr(
        viz, "_draw_order", lambda ax, order, H, W: drawn.append((order.tolist(), H, W))
    )
    path = draw_orders("video_sst", (3, 4, 5), tmp_path / "v.png")
    assert path.stat().st_size > 0
    assert len(drawn) == 12  # s layers cycle through 8 orders, t layers through 2
    spatial = [d for d in drawn if (d[1], d[2]) == (4, 5)]
    temporal = [d[0] for d in drawn if (d[1], d[2]) == (1, 3)]
    assert len(spatial) == 8 and all(sorted(order) == list(range(20)) for order, _, _ in spatial)
    assert temporal == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0]]
    monkeypatch.setattr(viz, "_draw_order", real)
    image = np.asarray(Image.open(draw_orders("video_t", (4, 3, 3), tmp_path / "t.png")))
    assert image.std() > 10


def test_cli_orders_takes_a_video_grid(tmp_path, capsys):
    out = tmp_path / "v.png"
    argv = ["orders", "--pattern", "video_st", "--grid", "2", "4", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    ("pattern", "grid", "message"),
    [
        ("video_st", ["4", "4"], r"needs a video grid .* \(pass --grid T H W\)"),
        ("zigzag8", ["2", "4", "4"], r"is for \(H, W\) grids.* \(pass --grid H W\)"),
        ("zigzag8", ["4"], "--grid takes H W or T H W, got 1 numbers"),
    ],
)
def test_cli_orders_names_the_grid_a_pattern_needs(tmp_path, pattern, grid, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(
            ["orders", "--pattern", pattern, "--grid", *grid, "--out", str(tmp_path / "x.png")]
        )


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib .*-e '\.\[viz\]'"):
        draw_orders("zigzag8", (4, 4), tmp_path / "x.png")
