"""Op-level workloads at the shapes a block of width D on L tokens feeds them.

- ``permute_tokens``: (B, L, D) tokens gathered in a zigzag order, per backend (GB/s counts
  one read and one write of the tokens);
- ``selective_scan``: the Mamba mixer's scan, u of shape (B, 2D, L) with d_state 16, per backend
  (the sweep runs the sequential ``reference`` at small L only);
- ``sdpa``: ``F.scaled_dot_product_attention`` with D/64 heads of 64, what attention costs at L.

Backends are the registered ones that can run on the device (probed through
:func:`zigzag_mamba.use_backend`), so a kernel registered later is benchmarked without changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zigzag_mamba.bench.contenders import LAYER_IDX, Workload, grid_for
from zigzag_mamba.ops.backends import BACKEND_NAMES, resolve, use_backend

D_STATE = 16
OPS = ("permute_tokens", "selective_scan", "sdpa")


def available_backends(op: str, device: torch.device) -> list[str]:
    """The backends of ``op`` that can run on ``device`` here, in registration order."""
    import zigzag_mamba.modules  # noqa: F401  (imports every op, so that all are registered)

    names = []
    for name in BACKEND_NAMES[1:]:
        with contextlib.suppress(ValueError, RuntimeError, TypeError), use_backend(**{op: name}):
            resolve(op, device.type)
            names.append(name)
    return names


def _permute_workload(
    backend: str, dim: int, length: int, batch: int, device: torch.device, dtype: torch.dtype
) -> Workload:
    from zigzag_mamba.ops.permute import permute_tokens
    from zigzag_mamba.orders import zigzag_orders

    order = zigzag_orders(*grid_for(length))[LAYER_IDX].to(device)
    x = torch.randn(batch, length, dim, device=device, dtype=dtype)
    return Workload(lambda t: permute_tokens(t, order), (x,), backends={"permute_tokens": backend})


def _scan_workload(
    backend: str, dim: int, length: int, batch: int, device: torch.device, dtype: torch.dtype
) -> Workload:
    from zigzag_mamba.ops.selective_scan import selective_scan

    d_inner = 2 * dim
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    dt = torch.exp(torch.rand(d_inner, device=device) * math.log(100)) * 1e-3
    params = (
        -torch.arange(1, D_STATE + 1, device=device, dtype=torch.float32).repeat(d_inner, 1),
        torch.ones(d_inner, device=device),
        dt + torch.log(-torch.expm1(-dt)),  # softplus^-1: dt starts in [1e-3, 0.1] as in Mamba
    )

    def scan(u, delta, z, B, C, A, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    u, z = make(batch, d_inner, length), make(batch, d_inner, length)
    B, C = make(batch, D_STATE, length), make(batch, D_STATE, length)
    delta = 0.1 * make(batch, d_inner, length)
    return Workload(scan, (u, delta, z, B, C, *params), backends={"selective_scan": backend})


def _sdpa_workload(
    backend: str, dim: int, length: int, batch: int, device: torch.device, dtype: torch.dtype
) -> Workload:
    heads = max(dim // 64, 1)
    q, k, v = (torch.randn(batch, heads, length, 64, device=device, dtype=dtype) for _ in "qkv")
    return Workload(F.scaled_dot_product_attention, (q, k, v))


_BUILDERS: dict[str, Callable[..., Workload]] = {
    "permute_tokens": _permute_workload,
    "selective_scan": _scan_workload,
    "sdpa": _sdpa_workload,
}


def op_backends(op: str, device: torch.device) -> list[str]:
    """Backends of ``op`` to time on ``device`` (SDPA's own kernel choice is PyTorch's)."""
    return ["torch"] if op == "sdpa" else available_backends(op, device)


def op_workload(
    op: str,
    backend: str,
    dim: int,
    length: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Workload:
    """The workload of ``op`` run by ``backend`` for a block of width ``dim`` on ``length``."""
    return _BUILDERS[op](backend, dim, length, batch, device, dtype)


def bytes_moved(op: str, dim: int, length: int, batch: int, dtype: torch.dtype) -> int | None:
    """Bytes an op must read and write at least (for GB/s), where that is meaningful."""
    if op != "permute_tokens":
        return None
    return 2 * batch * length * dim * torch.empty(0, dtype=dtype).element_size()
