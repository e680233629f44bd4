"""The backend registry: bad environment variables are reported, and forcing is per thread."""

from __future__ import annotations

import threading

import pytest
import torch

import zigzag_mamba
from zigzag_mamba import Mamba, ZigMaBlock
from zigzag_mamba.ops import permute_tokens, selective_scan


@pytest.mark.parametrize("op", ["selective_scan", "permute_tokens", "mixer_io", "causal_conv1d"])
def test_a_misspelt_environment_variable_is_reported_not_raised(monkeypatch, op):
    monkeypatch.setenv(f"ZIGZAG_MAMBA_{op.upper()}", "garbage")
    report = zigzag_mamba.backends()
    assert report[op]["cpu"].startswith(f"error: ZIGZAG_MAMBA_{op.upper()}='garbage'")
    others = [name for name in report if name != op]
    assert all(not report[name]["cpu"].startswith("error") for name in others)


def test_printing_a_model_survives_a_misspelt_environment_variable(monkeypatch):
    monkeypatch.setenv("ZIGZAG_MAMBA_SELECTIVE_SCAN", "garbage")
    text = repr(ZigMaBlock(16, (4, 4)))
    assert "selective_scan=\"none (ZIGZAG_MAMBA_SELECTIVE_SCAN='garbage'" in text


def test_running_the_op_raises_for_a_misspelt_selective_scan(monkeypatch):
    monkeypatch.setenv("ZIGZAG_MAMBA_SELECTIVE_SCAN", "garbage")
    with pytest.raises(ValueError, match="ZIGZAG_MAMBA_SELECTIVE_SCAN='garbage'"):
        Mamba(16)(torch.randn(1, 4, 16))


def test_a_misspelt_permute_tokens_is_rejected_when_the_op_runs(monkeypatch):
    monkeypatch.setenv("ZIGZAG_MAMBA_PERMUTE_TOKENS", "xyz")
    with pytest.raises(ValueError, match=r"ZIGZAG_MAMBA_PERMUTE_TOKENS='xyz'.*choose one of"):
        permute_tokens(torch.randn(2, 4, 3), torch.arange(4))


def _scan_inputs() -> tuple[torch.Tensor, ...]:
    u = torch.rand(1, 4, 8)
    return u, u, -torch.rand(4, 2), torch.randn(1, 2, 8), torch.randn(1, 2, 8)


def test_use_backend_holds_in_its_own_thread_only():
    seen = {}

    def other_thread() -> None:
        seen["other"] = zigzag_mamba.backends()["selective_scan"]["cpu"]
        with zigzag_mamba.use_backend(selective_scan="reference"):
            seen["other, forced"] = zigzag_mamba.backends()["selective_scan"]["cpu"]
            selective_scan(*_scan_inputs())

    with zigzag_mamba.use_backend(selective_scan="torch"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        seen["main"] = zigzag_mamba.backends()["selective_scan"]["cpu"]
    assert seen == {"other": "numba", "other, forced": "reference", "main": "torch"}
    assert zigzag_mamba.backends()["selective_scan"]["cpu"] == "numba"


def test_a_plain_call_of_use_backend_holds_until_reset():
    choice = zigzag_mamba.use_backend(selective_scan="torch")
    try:
        assert zigzag_mamba.backends()["selective_scan"]["cpu"] == "torch"
    finally:
        choice.reset()
    assert zigzag_mamba.backends()["selective_scan"]["cpu"] == "numba"
