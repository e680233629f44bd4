"""Triton selective scan against ``selective_scan_reference``, forward and every gradient.

The scan runs through the public op with the ``triton`` backend forced (under
``TRITON_INTERPRET=1`` it serves CPU tensors), so dispatch, autograd and the kernels are tested
together; a few tests call the launchers directly. Each result is held to at most twice the error
PyTorch's own reference makes in the same input dtypes against a float64 reference on the same
inputs (with a small floor per dtype). Every buffer a launcher allocates starts out as NaN, so an
element a kernel never writes fails the test.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

import zigzag_mamba
from zigzag_mamba.ops.backends import implementation
from zigzag_mamba.ops.selective_scan import ScanInputs, selective_scan, selective_scan_reference
from zigzag_mamba.ops.selective_scan import triton as kernels
from zigzag_mamba.ops.utils import poisoned_outputs

pytestmark = pytest.mark.triton

scan_module = importlib.import_module("zigzag_mamba.ops.selective_scan")
DEVICE = (
    "cuda" if os.environ.get("ZIGZAG_MAMBA_CUDA_TESTS") and torch.cuda.is_available() else "cpu"
)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Relative error allowed whatever PyTorch's own error is: rounding noise of the result's dtype.
# bf16's is loose because the interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to
# nearest), which alone doubles the error of every bf16 result.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


@contextlib.contextmanager
def checkpoint_every(chunk: int) -> Iterator[None]:
    """Run the op with a short chunk, so that short sequences span several chunks."""
    with mock.patch.object(scan_module, "CHUNK", chunk):
        yield


@contextlib.contextmanager
def chain_steps_of(chunks: int) -> Iterator[None]:
    """Join at most ``chunks`` chunks per step of the chains, so that few chunks take several."""
    with mock.patch.object(kernels, "_CHAIN_CHUNKS", chunks):
        yield


def triton_scan(**kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The public op with the Triton backend forced (its backward runs it too)."""
    with zigzag_mamba.use_backend(selective_scan="triton"):
        return selective_scan(**kwargs)


def make_inputs(
    batch: int = 2,
    channels: int = 6,
    n_state: int = 4,
    length: int = 29,
    groups: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs in Mamba's ranges (A < 0, dt > 0 with or without softplus); A, D, bias in fp32."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    data = {
        "u": rand(batch, channels, length),
        "delta": 0.5 * rand(batch, channels, length).abs(),
        "A": -torch.exp(0.5 * rand(channels, n_state)),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(channels),
        "z": rand(batch, channels, length),
        "delta_bias": 0.1 * rand(channels),
    }
    params = ("A", "D", "delta_bias")
    return {
        k: v.to(DEVICE, torch.float32 if k in params else dtype).requires_grad_()
        for k, v in data.items()
    }


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
    return {
        k: v.detach().to(dtype or v.dtype).requires_grad_() if v is not None else None
        for k, v in inputs.items()
    }


def _run(fn, inputs: dict, grads: list[torch.Tensor], **flags) -> list[torch.Tensor | None]:
    """Outputs and input gradients of one implementation, for the given output gradients."""
    outs = fn(**inputs, return_last_state=True, **flags)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads, strict=True) if g is not None]
    torch.autograd.backward(*map(list, zip(*pairs, strict=True)))
    # An input the differentiated outputs do not depend on has a zero gradient, not none.
    return [o.detach() for o in outs] + [
        None if inputs[k] is None else _grad_or_zeros(inputs[k]) for k in NAMES
    ]


def _grad_or_zeros(leaf: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad


def check_against_reference(
    inputs: dict[str, torch.Tensor | None],
    *,
    grad_last: bool = True,
    grad_out: bool = True,
    chunk_size: int = 4,
    **flags,
) -> None:
    """Forward outputs and all gradients within 2x PyTorch's own error (or the dtype floor)."""
    shape_out = inputs["u"].shape
    shape_last = (*shape_out[:2], inputs["A"].shape[1])
    g = torch.Generator().manual_seed(1)
    grads = [
        torch.randn(shape_out, generator=g).to(DEVICE) if grad_out else None,
        torch.randn(shape_last, generator=g).to(DEVICE) if grad_last else None,
    ]
    exact = _run(selective_scan_reference, _leaves(inputs, torch.float64), grads, **flags)
    torch_own = _run(selective_scan_reference, _leaves(inputs, None), grads, **flags)
    with checkpoint_every(chunk_size):
        ours = _run(triton_scan, _leaves(inputs, None), grads, **flags)
    for name, got, want, base in zip(
        ("out", "last_state", *NAMES), ours, exact, torch_own, strict=True
    ):
        if want is None:
            assert got is None, name
            continue
        if not want.any():
            assert torch.equal(got, torch.zeros_like(got)), name
            continue
        assert got.dtype == base.dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        tol = max(2 * rel_err(base, want), FLOOR[base.dtype])
        assert rel_err(got, want) <= tol, (name, rel_err(got, want), tol)


FLAGS = ("D", "z", "delta_bias", "delta_softplus")
# Every combination of the optional inputs and softplus, named by the ones that are on.
ALL_FEATURES = {
    "-".join(k for k, on in zip(FLAGS, bits, strict=True) if on) or "plain": dict(
        zip(FLAGS, bits, strict=True)
    )
    for bits in itertools.product((False, True), repeat=len(FLAGS))
}
ALL_ON = ALL_FEATURES["D-z-delta_bias-delta_softplus"]
FEATURES = {k: ALL_FEATURES[k] for k in ("plain", "D-z-delta_bias-delta_softplus", "z")}


def _select(inputs: dict, features: dict[str, bool]) -> tuple[dict, dict]:
    """Drop the optional inputs a feature set turns off; return (inputs, flags)."""
    chosen = {k: (v if features.get(k, True) else None) for k, v in inputs.items()}
    return chosen, {"delta_softplus": features["delta_softplus"]}


@pytest.mark.parametrize("features", list(ALL_FEATURES), ids=list(ALL_FEATURES))
def test_every_flag_combination_matches_reference(features: str) -> None:
    inputs, flags = _select(make_inputs(), ALL_FEATURES[features])
    check_against_reference(inputs, **flags)


@pytest.mark.parametrize("features", list(FEATURES), ids=list(FEATURES))
def test_grouped_b_and_c(features: str) -> None:
    inputs, flags = _select(make_inputs(groups=2, seed=1), FEATURES[features])
    check_against_reference(inputs, **flags)


# With chunks of 8: one step, a prime below one chunk, exactly one chunk, one chunk and a step,
# a prime over a few chunks, and many chunks (9, joined 4 at a time by the chains, so that they
# take three steps, the last one partial).
@pytest.mark.parametrize("length", [1, 7, 8, 9, 29, 67])
def test_lengths_around_the_chunk(length: int) -> None:
    inputs, flags = _select(make_inputs(length=length, seed=2), ALL_FEATURES["z-delta_softplus"])
    with chain_steps_of(4):
        check_against_reference(inputs, chunk_size=8, **flags)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "grouped"])
def test_low_precision_inputs(dtype: torch.dtype, groups: int | None) -> None:
    inputs, flags = _select(make_inputs(dtype=dtype, groups=groups, seed=3), ALL_ON)
    check_against_reference(inputs, **flags)


def test_several_channel_blocks_and_odd_state_size() -> None:
    # 33 channels of 16 states make three channel blocks per batch element (the last one
    # almost all masked), shared by two splits in the backward, so that one program walks two
    # of them; 3 states exercise masked state rows.
    for n_state, channels in ((16, 33), (3, 5)):
        inputs, flags = _select(
            make_inputs(batch=1, channels=channels, n_state=n_state, length=9, seed=4),
            ALL_ON,
        )
        check_against_reference(inputs, **flags)


@pytest.mark.parametrize("which", ["last_state", "out"])
def test_gradient_from_one_output_only(which: str) -> None:
    inputs, flags = _select(make_inputs(seed=5), ALL_ON)
    check_against_reference(
        inputs, grad_out=which == "out", grad_last=which == "last_state", **flags
    )


def _scan_inputs(inputs: dict, softplus: bool = True) -> ScanInputs:
    return ScanInputs(*(None if inputs[k] is None else inputs[k].detach() for k in NAMES), softplus)


def test_checkpoints_are_the_states_entering_each_chunk() -> None:
    inputs, _ = _select(make_inputs(length=21, seed=6), ALL_ON)
    x = _scan_inputs(inputs)
    _, last, ckpt = kernels.forward(x, 8)
    assert ckpt.shape == (2, 6, 3, 4) and ckpt.dtype == last.dtype == torch.float32
    assert torch.equal(ckpt[:, :, 0], torch.zeros_like(ckpt[:, :, 0]))
    for c, stop in ((1, 8), (2, 16)):
        prefix = [a[..., :stop] if a.dim() >= 3 else a for a in x.tensors]
        _, state = selective_scan_reference(*prefix, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(ckpt[:, :, c], state, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs() -> None:
    inputs, flags = _select(make_inputs(seed=7), ALL_ON)
    # The same values, laid out (B, L, D) underneath, as a mixer's projections leave them.
    strided = {
        k: v.detach().transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "z") else v
        for k, v in inputs.items()
    }
    assert not strided["u"].is_contiguous()
    check_against_reference(strided, **flags)


def test_backward_without_optional_inputs_or_last_state_gradient() -> None:
    inputs = make_inputs(seed=8)
    x = _scan_inputs({**inputs, "D": None, "z": None, "delta_bias": None}, softplus=False)
    out, _, ckpt = kernels.forward(x, 8)
    grads = kernels.backward(x, ckpt, torch.ones_like(out), None, 8)
    assert grads.dD is None and grads.dz is None and grads.ddelta_bias is None
    assert [g.shape for g in grads[:5]] == [t.shape for t in x.tensors[:5]]


@pytest.mark.parametrize(
    "overrides",
    [
        {"block_d": 2, "splits": 1},
        {"block_d": 4, "splits": 3, "tile": 8},
        {"block_d": 8, "num_warps": 2, "tile": 32},
    ],
    ids=["blocks2-splits1", "blocks4-splits3-tile8", "blocks8-tile32"],
)
def test_launch_overrides_give_the_same_results(overrides: dict) -> None:
    # 12 channels in 2 groups; chunks of 8 over L = 13 leave a partial chunk.
    inputs, _ = _select(make_inputs(channels=12, length=13, groups=2, seed=9), ALL_ON)
    x = _scan_inputs(inputs)
    grad = torch.randn_like(x.u)
    runs = []
    for kwargs in ({}, overrides):
        forward_only = {k: v for k, v in kwargs.items() if k not in ("splits", "tile")}
        fwd = kernels.forward(x, 8, **forward_only)
        bwd = kernels.backward(x, fwd[2], grad, None, 8, **kwargs)
        runs.append((*fwd, *bwd))
    for default, other in zip(*runs, strict=True):
        # Channels never interact in the forward; dB and dC sum over channels in another order
        # when the blocks or splits change.
        torch.testing.assert_close(other, default, rtol=1e-6, atol=1e-6)


def test_backward_scratch_does_not_grow_with_channel_blocks() -> None:
    # Every buffer the backward allocates besides the gradients of u, delta and z: the carries
    # (as large as the checkpoints), per-chunk and per-tile sums, a (N, L) partial of dB and of
    # dC per split, and a scratch tile per program. Whether a group's 16 channels make 8
    # blocks or 2, only the scratch changes, with the channels per program.
    inputs, _ = _select(make_inputs(batch=1, channels=16, length=13, seed=12), ALL_ON)
    x = _scan_inputs(inputs)
    out, _, ckpt = kernels.forward(x, 8)
    batch, channels, n_chunks, n_state = ckpt.shape
    length = x.u.shape[2]
    totals = []
    for block_d in (2, 8):
        sizes = []
        real = kernels.new_empty

        def recording(shape, dtype, device, sizes=sizes, real=real):
            buffer = real(shape, dtype, device)
            if tuple(shape) != tuple(x.u.shape):
                sizes.append(buffer.numel() * buffer.element_size())
            return buffer

        with mock.patch.object(kernels, "new_empty", recording):
            kernels.backward(
                x, ckpt, torch.ones_like(out), None, 8, block_d=block_d, splits=2, tile=16
            )
        n_tiles = -(-length // 16)
        scratch = batch * 2 * n_tiles * 2 * block_d * 16 * 4
        totals.append(sum(sizes) - scratch)
    per_chunk = batch * channels * n_chunks * 4
    partials = 2 * batch * 2 * n_state * length * 4
    assert totals[0] == totals[1] <= 2 * ckpt.numel() * 4 + 3 * per_chunk + partials


def test_two_runs_are_bit_identical() -> None:
    inputs, flags = _select(make_inputs(length=21, groups=2, seed=10), ALL_ON)
    grad = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(3))

    def run() -> list[torch.Tensor]:
        leaves = _leaves(inputs, None)
        with checkpoint_every(8):
            out, last = triton_scan(**leaves, **flags, return_last_state=True)
            torch.autograd.backward([out, last], [grad.to(DEVICE), torch.ones_like(last)])
        return [out.detach(), last.detach()] + [leaves[k].grad for k in NAMES]

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_float64_inputs_run_the_portable_scan() -> None:
    inputs, flags = _select(make_inputs(seed=11), ALL_ON)
    leaves = _leaves(inputs, torch.float64)
    with zigzag_mamba.use_backend(selective_scan="triton"):
        assert implementation("selective_scan", DEVICE, leaves["u"]) == "torch"
    out = triton_scan(**leaves, **flags)
    torch.testing.assert_close(out, selective_scan_reference(**leaves, **flags))


def test_rejects_bad_arguments() -> None:
    inputs = make_inputs(channels=6, groups=4)
    with pytest.raises(ValueError, match="D % G == 0"):
        triton_scan(**{k: inputs[k].detach() for k in ("u", "delta", "A", "B", "C")})
    x = _scan_inputs({**make_inputs(), "D": None, "z": None, "delta_bias": None}, False)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        kernels.forward(x, 12)
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        kernels.forward(x, 8, block_d=3)
    out, _, ckpt = kernels.forward(x, 8)
    with pytest.raises(ValueError, match="do not fit chunks of 16"):
        kernels.backward(x, ckpt, torch.ones_like(out), None, 16)
