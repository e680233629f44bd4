import sys

import numpy as np
import pytest
from PIL import Image

from zigzag_mamba import cli
from zigzag_mamba.viz import draw_scans


def test_draw_scans_writes_a_png(tmp_path):
    path = draw_scans("hilbert8", (5, 7), tmp_path / "sub" / "scans.png")
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 10  # something was drawn, not a blank canvas


def test_cli_scans_writes_the_file(tmp_path, capsys):
    out = tmp_path / "z.png"
    assert cli.main(["scans", "--pattern", "zigzag8", "--grid", "8", "8", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_cli_lists_patterns(capsys):
    assert cli.main(["scans", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "zigzag8" in names and "hilbert8" in names


def test_video_grids_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        draw_scans("video_st", (2, 4, 4), tmp_path / "v.png")


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"zigzag-mamba\[viz\]"):
        draw_scans("zigzag8", (4, 4), tmp_path / "x.png")
