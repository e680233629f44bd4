"""The files save_pretrained writes get the permissions any new file gets."""

import os
import stat

import pytest

from zigzag_mamba import CONFIGS, ZigMaBackbone

pytest.importorskip("safetensors")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_have_the_usual_permissions(tmp_path, umask):
    model = ZigMaBackbone(input_size=8, in_channels=1, **{**CONFIGS["ZigMa-T/2"], "depth": 1})
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE((tmp_path / "saved" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))
    ZigMaBackbone.from_pretrained(tmp_path / "saved")
