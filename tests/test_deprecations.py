"""Old names keep working, each with a DeprecationWarning, and give what the new names give."""

from __future__ import annotations

import json

import pytest
import torch

import zigzag_mamba
from zigzag_mamba import CONFIGS, ZigMaBackbone, ZigMaBlock, ZigzagScan
from zigzag_mamba.ops import mixer_in, mixer_out, scan_in, scan_out
from zigzag_mamba.ops.backends import requested


def test_block_scan_argument_attribute_and_stages():
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="'scan' is now called 'pattern'"):
        old = ZigMaBlock(16, (2, 3), scan="sweep2", layer_idx=1)
    new = ZigMaBlock(16, (2, 3), pattern="sweep2", layer_idx=1)
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 6, 16)
    assert torch.equal(old(x), new(x))
    with pytest.warns(DeprecationWarning, match="permutation"):
        assert old.scan is old.permutation
    with pytest.warns(DeprecationWarning, match="mixer_in"):
        residual, h_norm, tokens = old.scan_in(x, None, None, None)
    assert all(
        torch.equal(a, b)
        for a, b in zip((residual, h_norm, tokens), new.mixer_in(x, None, None, None), strict=True)
    )
    with pytest.warns(DeprecationWarning, match="mixer_out"):
        out = old.scan_out(tokens, h_norm, None)
    assert torch.equal(out, new.mixer_out(h_norm, None, tokens))


def test_zigzag_scan_methods():
    zigzag = ZigzagScan((3, 4), "zigzag8", layer_idx=5)
    x = torch.randn(2, 12, 3)
    with pytest.warns(DeprecationWarning, match="permute"):
        y = zigzag.scan(x)
    assert torch.equal(y, zigzag.permute(x))
    with pytest.warns(DeprecationWarning, match="unpermute"):
        assert torch.equal(zigzag.unscan(y), x)


def test_backbone_arguments_and_config_keys(tmp_path):
    kwargs = {**CONFIGS["ZigMa-T/2"], "in_channels": 2}
    with pytest.warns(DeprecationWarning, match="'d_context' is now called 'context_dim'"):
        old = ZigMaBackbone(8, scan="sweep4", d_context=12, **kwargs)
    assert old.config.pattern == "sweep4" and old.config.context_dim == 12
    assert old.config.input_size == (8, 8)
    with pytest.warns(DeprecationWarning, match="ZigMaConfig"):
        assert old.config["scan"] == "sweep4" and old.config["dim"] == 64
    # A folder written before the rename: its config.json still says "scan" and "d_context".
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["scan"], config["d_context"] = config.pop("pattern"), config.pop("context_dim")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(DeprecationWarning, match="'scan' is now called 'pattern'"):
        loaded = ZigMaBackbone.from_pretrained(tmp_path)
    assert loaded.config == old.config


def test_op_names():
    h, w = torch.randn(2, 6, 4), torch.rand(4)
    order = torch.tensor([5, 0, 4, 1, 3, 2])
    with pytest.warns(DeprecationWarning, match="scan_in is now called mixer_in"):
        old = scan_in(h, None, w, order=order)
    new = mixer_in(h, None, w, order=order)
    assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    with pytest.warns(DeprecationWarning, match="'y_seq' is now called 'y'"):
        out = scan_out(new[1], None, y_seq=new[2], order=order)
    assert torch.equal(out, mixer_out(new[1], None, new[2], order))


def test_backend_and_op_names(monkeypatch):
    with pytest.warns(DeprecationWarning, match="'fused' is now called 'numba'"):
        forced = zigzag_mamba.use_backend(selective_scan="fused")
    with forced:
        assert requested("selective_scan") == "numba"
    with pytest.warns(DeprecationWarning, match="'fused_scan' is now called 'mixer_io'"):
        forced = zigzag_mamba.use_backend(fused_scan="torch")
    with forced:
        assert requested("mixer_io") == "torch"
    monkeypatch.setenv("ZIGZAG_MAMBA_SELECTIVE_SCAN", "fused")
    with pytest.warns(DeprecationWarning, match="'fused' is now called 'numba'"):
        assert requested("selective_scan") == "numba"
