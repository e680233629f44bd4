"""Mamba-1 selective scan with the semantics and layouts of mamba_ssm's ``selective_scan_fn``.

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or grouped (B, G, N, L) with D % G == 0;
D, delta_bias (D,); last state (B, D, N). The state recurrence, per channel d and state n::

    dt[t]   = softplus(delta[t] + delta_bias)          (softplus optional)
    x[t]    = exp(dt[t] * A[d, n]) * x[t-1] + dt[t] * B[n, t] * u[t]
    y[t]    = sum_n x[t] * C[n, t] + D[d] * u[t]        then  y * silu(z)   (z optional)

Accumulation is in fp32 (float64 stays float64); the output has u's dtype, the last state the
accumulation dtype.

Stack: :func:`selective_scan` (checks, and the "reference" escape hatch) -> the custom op
``zigzag_mamba::selective_scan_fwd`` with a fake and a hand-written backward (itself the custom op
``zigzag_mamba::selective_scan_bwd``) -> one kernel per device type, each running the backend
that :func:`~zigzag_mamba.ops.backends.resolve` picks from :data:`IMPLEMENTATIONS`:

- ``mamba_ssm`` (CUDA): mamba-ssm's kernel, when it imports;
- ``fused`` (CPU): numba kernels in :mod:`zigzag_mamba.ops.cpu.selective_scan`;
- ``torch`` (any device): a chunked scan in PyTorch, below;
- ``reference``: :func:`selective_scan_reference`, the sequential loop every backend is tested
  against; when it is forced, :func:`selective_scan` calls it directly, bypassing the op.

Every backend except mamba-ssm checkpoints the state every :data:`CHUNK` steps in the forward and
recomputes one chunk at a time in the backward, so memory stays O(B * D * L).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from zigzag_mamba.ops.backends import register_backend, requested, resolve

OP = "selective_scan"
CHUNK = 64  # steps between state checkpoints (and the torch backend's chunk length)
_ALL_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _expand_groups(bc: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, L) -> (B, 1, N, L); (B, G, N, L) -> (B, D, N, L), channel d in group d // (D/G)."""
    if bc.dim() == 3:
        return bc.unsqueeze(1)
    groups = bc.shape[1]
    return bc.repeat_interleave(channels // groups, dim=1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A plain sequential loop over L: slow, obviously correct, differentiable by autograd."""
    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    channels = u.shape[1]
    B = _expand_groups(B.to(compute), channels)
    C = _expand_groups(C.to(compute), channels)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((state * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, state) if return_last_state else y


def _probe_mamba_ssm() -> str | None:
    importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    return None


def _probe_fused() -> str | None:
    try:
        importlib.import_module("zigzag_mamba.ops.cpu.selective_scan")
    except Exception as exc:  # numba missing or broken: the PyTorch path takes over
        warnings.warn(
            f"the fused CPU selective scan is unavailable ({type(exc).__name__}: {exc}); "
            "using the slower PyTorch scan",
            RuntimeWarning,
            stacklevel=2,
        )
        return f"{type(exc).__name__}: {exc}"
    return None


# Order is preference for "auto"; a Triton kernel for CUDA slots in after "mamba_ssm".
register_backend(OP, "mamba_ssm", ("cuda",), _probe_mamba_ssm)
register_backend(OP, "fused", ("cpu",), _probe_fused)
register_backend(OP, "torch", _ALL_DEVICES)
register_backend(OP, "reference", _ALL_DEVICES)


# --------------------------------------------------------------------------------------------
# The chunked PyTorch backend. Channels are viewed as (G, P): group g holds channels
# g * P .. (g + 1) * P - 1, which all read B[:, g] and C[:, g].


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, n_group: int) -> torch.Tensor:
    """(b, D, ...) -> (b, G, P, ...)."""
    return x.view(x.shape[0], n_group, x.shape[1] // n_group, *x.shape[2:])


def _state_last(bc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, N, L) or (b, G, N, L) -> (b, G, L, N), so that a chunk of steps is one slice."""
    grouped = bc if bc.dim() == 4 else bc.unsqueeze(1)
    return grouped.to(dtype).transpose(-1, -2)


def _dt(delta, delta_bias, softplus, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dt and, under softplus, d dt / d delta (= sigmoid of the softplus argument)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if not softplus:
        return dt, None
    return F.softplus(dt), torch.sigmoid(dt)


class _Chunk(NamedTuple):
    decay: torch.Tensor  # exp(dt * A), (b, G, P, T, N)
    states: torch.Tensor  # state after each step, (b, G, P, T, N)
    dt: torch.Tensor  # (b, G, P, T)
    u: torch.Tensor  # (b, G, P, T)
    dtu: torch.Tensor  # dt * u, (b, G, P, T)
    B: torch.Tensor  # (b, G, T, N)
    C: torch.Tensor  # (b, G, T, N)


def _scan_chunk(dt, u, A, Bt, Ct, start, stop, state) -> _Chunk:
    """States of steps start..stop from ``state``, vectorised except for one fused op per step."""
    dt_c, u_c = dt[..., start:stop], u[..., start:stop]
    B_c, C_c = Bt[:, :, start:stop], Ct[:, :, start:stop]
    dtu = dt_c * u_c
    decay = torch.exp(dt_c.unsqueeze(-1) * A.unsqueeze(-2))
    states = dtu.unsqueeze(-1) * B_c.unsqueeze(2)
    previous = state
    for i in range(stop - start):
        previous = states[..., i, :].addcmul_(decay[..., i, :], previous)
    return _Chunk(decay, states, dt_c, u_c, dtu, B_c, C_c)


def _readout(chunk: _Chunk) -> torch.Tensor:
    return torch.einsum("bgptn,bgtn->bgpt", chunk.states, chunk.C)


def _torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype = _compute_dtype(u)
    Bt, Ct = _state_last(B, dtype), _state_last(C, dtype)
    n_group = Bt.shape[1]
    dt = _grouped(_dt(delta, delta_bias, delta_softplus, dtype)[0], n_group)
    ug, Ag = _grouped(u.to(dtype), n_group), _grouped(A.to(dtype)[None], n_group)[0]
    state = ug.new_zeros(*ug.shape[:3], A.shape[1])
    ys, ckpts = [], []
    for start in range(0, u.shape[2], CHUNK):
        ckpts.append(state)
        chunk = _scan_chunk(dt, ug, Ag, Bt, Ct, start, min(start + CHUNK, u.shape[2]), state)
        state = chunk.states[..., -1, :]
        ys.append(_readout(chunk))
    y = _skip_and_gate(torch.cat(ys, -1).flatten(1, 2), u, D, z, dtype)[0]
    ckpt = torch.stack(ckpts, 3).flatten(1, 2)
    return y.to(u.dtype), state.flatten(1, 2).clone(), ckpt


def _skip_and_gate(y, u, D, z, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y + D u) * silu(z), and the gate's derivative factor y * silu'(z) (None without z)."""
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[:, None]
    if z is None:
        return y, None
    zc = z.to(dtype)
    sig = torch.sigmoid(zc)
    return y * zc * sig, y * sig * (1 + zc * (1 - sig))


def _torch_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    dtype = ckpt.dtype
    Bt, Ct = _state_last(B, dtype), _state_last(C, dtype)
    n_group, length = Bt.shape[1], u.shape[2]
    dt_flat, dt_grad = _dt(delta, delta_bias, delta_softplus, dtype)
    dt = _grouped(dt_flat, n_group)
    ug, Ag = _grouped(u.to(dtype), n_group), _grouped(A.to(dtype)[None], n_group)[0]
    dy = dout.to(dtype) if z is None else dout.to(dtype) * F.silu(z.to(dtype))
    dyg, ckpt_g = _grouped(dy, n_group), _grouped(ckpt, n_group)
    adjoint = _grouped(dlast.to(dtype), n_group)  # d loss / d state, carried backwards
    dA = torch.zeros_like(Ag)
    parts: dict[str, list[torch.Tensor]] = {"du": [], "ddt": [], "y": [], "dB": [], "dC": []}
    for start in reversed(range(0, length, CHUNK)):
        stop = min(start + CHUNK, length)
        state = ckpt_g[..., start // CHUNK, :]
        chunk = _scan_chunk(dt, ug, Ag, Bt, Ct, start, stop, state)
        adjoint = _chunk_backward(chunk, state, dyg[..., start:stop], Ag, adjoint, dA, parts)
    du, ddt, y = (torch.cat(parts[k][::-1], -1).flatten(1, 2) for k in ("du", "ddt", "y"))
    dB, dC = (torch.cat(parts[k][::-1], -2) for k in ("dB", "dC"))
    dgate = _skip_and_gate(y, u, D, z, dtype)[1]
    if D is not None:
        du = du + dy * D.to(dtype)[:, None]
    ddelta = ddt if dt_grad is None else ddt * dt_grad
    return (
        du,
        ddelta,
        dA.flatten(0, 1),
        dB.transpose(-1, -2).reshape(B.shape),
        dC.transpose(-1, -2).reshape(C.shape),
        None if D is None else (dy * u.to(dtype)).sum((0, 2)),
        None if z is None else dout.to(dtype) * dgate,
        None if delta_bias is None else ddelta.sum((0, 2)),
    )


def _chunk_backward(chunk: _Chunk, state, dy, A, adjoint, dA, parts) -> torch.Tensor:
    """Gradients of one chunk; returns the adjoint to carry into the previous chunk."""
    # adjoints[i] = d loss / d state after step i: injected dy C, plus the later steps' share.
    adjoints = dy.unsqueeze(-1) * chunk.C.unsqueeze(2)
    adjoints[..., -1, :] += adjoint
    for i in range(adjoints.shape[-2] - 2, -1, -1):
        adjoints[..., i, :].addcmul_(chunk.decay[..., i + 1, :], adjoints[..., i + 1, :])
    before = torch.cat([state.unsqueeze(-2), chunk.states[..., :-1, :]], -2)
    parts["y"].append(_readout(chunk))
    parts["dC"].append(torch.einsum("bgptn,bgpt->bgtn", chunk.states, dy))
    parts["dB"].append(torch.einsum("bgptn,bgpt->bgtn", adjoints, chunk.dtu))
    adj_b = torch.einsum("bgptn,bgtn->bgpt", adjoints, chunk.B)
    carry = chunk.decay[..., 0, :] * adjoints[..., 0, :]
    # d loss / d (dt * A) at each step, reusing the adjoints' memory.
    d_exponent = adjoints.mul_(chunk.decay).mul_(before)
    dA += torch.einsum("bgptn,bgpt->gpn", d_exponent, chunk.dt)
    parts["ddt"].append(torch.einsum("bgptn,gpn->bgpt", d_exponent, A) + chunk.u * adj_b)
    parts["du"].append(chunk.dt * adj_b)
    return carry


# --------------------------------------------------------------------------------------------
# mamba-ssm on CUDA. Its autograd function is the only public entry point, so the backward
# recomputes the forward under autograd (one extra forward) rather than call private kernels.


def _mamba_ssm_inputs(u, delta, A, B, C, D, z, delta_bias):
    # Its kernels take float32 A, D and delta_bias whatever the activation dtype.
    as_f32 = lambda t: None if t is None else t.float()
    return u, delta, as_f32(A), B, C, as_f32(D), z, as_f32(delta_bias)


def _mamba_ssm_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if u.dtype == torch.float64:  # not among its kernel's dtypes
        return _torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    inputs = _mamba_ssm_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last = selective_scan_fn(*inputs, delta_softplus, return_last_state=True)
    return out, last.float(), _checkpoint_buffer(u, A)  # it saves its own checkpoints


def _mamba_ssm_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    if u.dtype == torch.float64:
        return _torch_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                               delta_softplus)  # fmt: skip
    if bool(dlast.any()):
        raise NotImplementedError(
            "mamba-ssm's selective scan has no gradient for the last state; "
            "use zigzag_mamba.use_backend(selective_scan='torch') to differentiate through it"
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    leaves = _leaves(u, delta, A, B, C, D, z, delta_bias)
    with torch.enable_grad():
        out = selective_scan_fn(*_mamba_ssm_inputs(*leaves), delta_softplus)
        return _grads(out, leaves, dout)


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def _grads(outputs, leaves, grad_outputs) -> tuple[torch.Tensor | None, ...]:
    """Vector-Jacobian product for every leaf that is not None."""
    grads = iter(torch.autograd.grad(outputs, [t for t in leaves if t is not None], grad_outputs))
    return tuple(None if t is None else next(grads) for t in leaves)


# --------------------------------------------------------------------------------------------
# Dispatch: backend name -> (forward, backward). Forward returns (out, last state, checkpoints);
# backward returns the eight input gradients (None for absent optional inputs).


def _fused_forward(*args):
    from zigzag_mamba.ops.cpu import selective_scan as kernels

    return kernels.forward(*args, chunk=CHUNK)


def _fused_backward(*args):
    from zigzag_mamba.ops.cpu import selective_scan as kernels

    return kernels.backward(*args, chunk=CHUNK)


class Implementation(NamedTuple):
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor | None, ...]]


#: Backend name -> implementation; a new backend registers itself here and with
#: :func:`~zigzag_mamba.ops.backends.register_backend`.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "mamba_ssm": Implementation(_mamba_ssm_forward, _mamba_ssm_backward),
    "fused": Implementation(_fused_forward, _fused_backward),
    "torch": Implementation(_torch_forward, _torch_backward),
}
# Forcing "reference" makes selective_scan() run the loop itself, differentiated by autograd,
# which a custom op cannot do under tracing; a direct call of the op then runs the exact
# chunked scan.
IMPLEMENTATIONS["reference"] = IMPLEMENTATIONS["torch"]


def _checkpoint_buffer(u: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Zeros of the checkpoints' shape, for backends that keep no checkpoints of their own."""
    shape = (u.shape[0], u.shape[1], -(-u.shape[2] // CHUNK), A.shape[1])
    return u.new_zeros(shape, dtype=_compute_dtype(u))


@torch.library.custom_op("zigzag_mamba::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Devices without a kernel of their own run the portable PyTorch scan.
    return _torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _forward_on(device_type: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        impl = IMPLEMENTATIONS[resolve(OP, device_type)]
        return impl.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    return kernel


_scan_fwd.register_kernel("cpu")(_forward_on("cpu"))
_scan_fwd.register_kernel("cuda")(_forward_on("cuda"))


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    last = u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=_compute_dtype(u))
    return u.new_empty(u.shape), last, _checkpoint_buffer(u, A)


@torch.library.custom_op("zigzag_mamba::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    dout: torch.Tensor,
    dlast: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    ckpt: torch.Tensor,
    delta_softplus: bool,
) -> list[torch.Tensor]:
    grads = _torch_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                            delta_softplus)  # fmt: skip
    return _pack_grads(grads, (u, delta, A, B, C, D, z, delta_bias))


def _pack_grads(grads, inputs) -> list[torch.Tensor]:
    """Gradients in their inputs' dtypes; an absent optional input gets an empty tensor."""
    u = inputs[0]
    return [
        u.new_empty(0) if x is None else g.to(x.dtype).contiguous()
        for g, x in zip(grads, inputs, strict=True)
    ]


def _backward_on(device_type: str) -> Callable[..., list[torch.Tensor]]:
    def kernel(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
        impl = IMPLEMENTATIONS[resolve(OP, device_type)]
        grads = impl.backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                              delta_softplus)  # fmt: skip
        return _pack_grads(grads, (u, delta, A, B, C, D, z, delta_bias))

    return kernel


_scan_bwd.register_kernel("cpu")(_backward_on("cpu"))
_scan_bwd.register_kernel("cuda")(_backward_on("cuda"))


@_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return [u.new_empty(0) if x is None else x.new_empty(x.shape) for x in inputs]


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    if dlast is None:
        dlast = ckpt.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    grads = _scan_bwd(dout.contiguous(), dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                      ctx.delta_softplus)  # fmt: skip
    optional = (None, None, None, None, None, D, z, delta_bias)
    return (*(g if i < 5 or optional[i] is not None else None for i, g in enumerate(grads)), None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan: mamba_ssm's ``selective_scan_fn`` on any device.

    See the module docstring for shapes and the recurrence. Returns ``out`` (B, D, L) in u's
    dtype, and with ``return_last_state`` also the final state (B, D, N) in the accumulation
    dtype. Differentiable in every tensor argument (the last state too, except on mamba-ssm).

    Example::

        >>> u = delta = torch.rand(2, 8, 64)
        >>> A = -torch.rand(8, 16)
        >>> B = C = torch.randn(2, 16, 64)
        >>> selective_scan(u, delta, A, B, C, delta_softplus=True).shape
        torch.Size([2, 8, 64])
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if requested(OP) == "reference":
        return selective_scan_reference(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    out, last, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("u, delta (and z) must share one shape (B, D, L)")
    n_batch, n_chan, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != n_chan:
        raise ValueError(f"A must be real with shape (D, N) = ({n_chan}, N), got {tuple(A.shape)}")
    for name, bc in (("B", B), ("C", C)):
        n_group = bc.shape[1] if bc.dim() == 4 else 1
        expected = (n_batch, *((n_group,) if bc.dim() == 4 else ()), A.shape[1], length)
        if tuple(bc.shape) != expected or n_chan % n_group:
            raise ValueError(
                f"{name} must have shape (B, N, L) or (B, G, N, L) with D % G == 0, "
                f"got {tuple(bc.shape)} for u {tuple(u.shape)} and A {tuple(A.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (n_chan,):
            raise ValueError(f"{name} must have shape ({n_chan},), got {tuple(vec.shape)}")
