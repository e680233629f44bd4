"""The accuracy rule of the Triton tests: a kernel's error against a float64 evaluation is at
most twice PyTorch's own in that dtype, with a small floor (docs/design.md, "Testing")."""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item() if x.numel() else 0.0


def floor(dtype: torch.dtype) -> float:
    """The smallest error bound, relative to the largest magnitude of the expected values.

    Both paths compute in fp32 or better, where summation order alone moves a sum by a few ulps,
    and PyTorch's own error can be near zero by luck: 8 fp32 ulps are always allowed. The Triton
    interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), so there a bf16
    result may be off by a whole bf16 ulp instead of half of one.
    """
    if dtype == torch.bfloat16 and not ON_GPU:
        return torch.finfo(torch.bfloat16).eps
    return 8 * torch.finfo(torch.float32).eps


def assert_within_2x(name: str, out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor):
    assert out.shape == ref64.shape and out.dtype == torch_out.dtype, name
    assert not out.isnan().any(), f"{name}: unwritten (NaN) elements"
    err, torch_err = error(out, ref64), error(torch_out, ref64)
    bound = floor(out.dtype) * ref64.abs().max().item() if ref64.numel() else 0.0
    assert err <= max(2 * torch_err, bound), (
        f"{name}: error {err:.3g} > max(2 x PyTorch's {torch_err:.3g}, floor {bound:.3g})"
    )
