"""The cross mixer: k orders in one layer, as one batched scan, against k separate Mamba mixers
(the definition) on fresh random inputs; and the one argument that selects it everywhere."""

import math

import pytest
import torch
from helpers import randomise

from zigzag_mamba import ZigMaBackbone, ZigMaBlock
from zigzag_mamba.modules.block import ZigMaMixer
from zigzag_mamba.modules.cross_mamba import CrossMamba
from zigzag_mamba.modules.mamba import Mamba
from zigzag_mamba.ops import permute_tokens, use_backend
from zigzag_mamba.orders import layer_layout

DIM = 16


def direction(cross: CrossMamba, j: int) -> Mamba:
    """Order j of a CrossMamba as a plain Mamba: the shared projections and the j-th slices of
    the stacked parameters (the mapping its docstring states)."""
    E = cross.d_inner
    rows = slice(j * E, (j + 1) * E)
    mamba = Mamba(cross.d_model, d_state=cross.d_state, d_conv=cross.d_conv).to(cross.D.dtype)
    state = {
        "in_proj.weight": cross.in_proj.weight,
        "out_proj.weight": cross.out_proj.weight,
        "conv1d.weight": cross.conv1d.weight[rows],
        "conv1d.bias": cross.conv1d.bias[rows],
        "x_proj.weight": cross.x_proj_weight[j],
        "dt_proj.weight": cross.dt_proj_weight[j],
        "dt_proj.bias": cross.dt_proj_bias[j],
        "A_log": cross.A_log[rows],
        "D": cross.D[rows],
    }
    mamba.load_state_dict({name: value.detach() for name, value in state.items()})
    return mamba


def _cross(k: int, seed: int, dtype=torch.float32) -> CrossMamba:
    torch.manual_seed(seed)
    cross = CrossMamba(DIM, k=k, d_state=4).to(dtype)
    randomise(cross, seed)
    return cross


@pytest.mark.parametrize("k", [2, 4])
def test_cross_mixer_is_the_sum_of_k_mamba_mixers_over_their_orders(k):
    cross = _cross(k, seed=k)
    permutation = layer_layout("zigzag8", (5, 7), layer_idx=1, num_orders=k).permutation
    x = torch.randn(3, 35, DIM)
    expected = sum(
        permute_tokens(direction(cross, j)(permute_tokens(x, order)), inverse)
        for j, (order, inverse) in enumerate(zip(*permutation, strict=True))
    )
    torch.testing.assert_close(cross(x, permutation), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_the_loop_over_k_reference_mixers(dtype):
    cross = _cross(4, seed=5, dtype=dtype)
    permutation = layer_layout("sweep4", (4, 6), num_orders=4, num_prefix_tokens=1).permutation
    x = torch.randn(2, 25, DIM, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 25, DIM, dtype=dtype)
    results = []
    for forward in (cross, cross.forward_reference):
        out = forward(x, permutation)
        results.append([out, *torch.autograd.grad(out, [x, *cross.parameters()], grad)])
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_every_order_starts_as_a_mamba_mixer_does():
    cross = CrossMamba(DIM, k=3, d_state=5, dt_min=0.01, dt_max=0.05)
    assert cross.A_log.shape == (3 * cross.d_inner, 5)
    assert torch.equal(cross.A_log.exp(), torch.arange(1.0, 6).expand(3 * cross.d_inner, 5))
    assert torch.equal(cross.D, torch.ones(3 * cross.d_inner))
    dt = torch.nn.functional.softplus(cross.dt_proj_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    bound = 1 / math.sqrt(cross.d_inner)  # nn.Linear's x_proj init, per order
    assert cross.x_proj_weight.abs().max() <= bound
    # The orders are initialised independently, not as copies of one another.
    assert not torch.equal(cross.x_proj_weight[0], cross.x_proj_weight[1])
    assert cross.A_log._no_weight_decay and cross.D._no_weight_decay


def test_the_numba_and_torch_scans_agree_on_the_grouped_inputs():
    cross = _cross(4, seed=8)
    permutation = layer_layout("zigzag8", (6, 6), num_orders=4).permutation
    x = torch.randn(2, 36, DIM)
    outputs = []
    for backend in ("numba", "torch"):
        with use_backend(selective_scan=backend):
            outputs.append(cross(x, permutation))
    torch.testing.assert_close(*outputs, rtol=1e-4, atol=1e-5)


def test_block_with_the_cross_mixer_reads_k_orders_around_its_prefix_tokens():
    block = ZigMaBlock(
        DIM,
        pattern="zigzag8",
        layer_idx=1,
        mixer="cross",
        num_prefix_tokens=1,
        ssm_cfg={"k": 2, "d_state": 4},
    )
    randomise(block, 3)
    x, c = torch.randn(2, 1 + 4 * 5, DIM), torch.randn(2, DIM)
    out = block(x, c, grid=(4, 5))
    # By hand: the stages without a permutation around the mixer, which reads orders S2 and S3.
    permutation = layer_layout("zigzag8", (4, 5), 1, num_prefix_tokens=1, num_orders=2).permutation
    assert torch.equal(permutation.order, block.zigzag.layout(x, (4, 5)).permutation.order)
    shift, scale, gate = block.adaLN_modulation(c).chunk(3, dim=-1)
    h = block.norm(x) * (1 + scale[:, None]) + shift[:, None]
    mixed = block.mixer(h, permutation)
    expected = x + block.norm(x) + gate[:, None] * mixed
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_zigma_mixer_and_backbone_take_the_same_argument():
    mixer = ZigMaMixer(DIM, (3, 4), "sweep4", mixer="cross", ssm_cfg={"d_state": 4})
    assert isinstance(mixer.mixer, CrossMamba) and mixer.zigzag.order.shape == (4, 12)
    assert mixer(torch.randn(2, 12, DIM)).shape == (2, 12, DIM)
    model = ZigMaBackbone(
        input_size=8,
        patch_size=2,
        in_channels=3,
        dim=DIM,
        depth=2,
        pattern="sweep4",
        mixer="cross",
        ssm_cfg={"d_state": 4},
    )
    assert all(isinstance(block.mixer, CrossMamba) for block in model.blocks)
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_cross_block_exports():
    block = ZigMaBlock(DIM, (4, 4), "sweep4", mixer="cross", ssm_cfg={"d_state": 4})
    randomise(block, 2)
    x, c = torch.randn(2, 16, DIM), torch.randn(2, DIM)
    exported = torch.export.export(block, (x, c))
    torch.testing.assert_close(exported.module()(x, c), block(x, c))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pattern": None}, "pattern=None has none"),
        ({"grid": (2, 4, 4), "pattern": "video_sst"}, "num_orders > 1 needs a pattern"),
        ({"ssm_cfg": {"k": 0}}, "k"),
        ({"ssm_cfg": {"k": 1}}, "k=1 is 'mamba'"),
        ({"mixer": "crossed"}, r"mixer must be one of \['bidirectional', 'cross', 'mamba'\]"),
    ],
)
def test_bad_cross_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZigMaBlock(DIM, **{"grid": (4, 4), "mixer": "cross", **kwargs})


def test_cross_mixer_refuses_orders_it_was_not_built_for():
    cross = CrossMamba(DIM, k=4, d_state=4)
    x = torch.randn(1, 16, DIM)
    with pytest.raises(ValueError, match="k=4 orders; got 2"):
        cross(x, layer_layout("sweep4", (4, 4), num_orders=2).permutation)
    with pytest.raises(TypeError, match="Permutation of its k=4 orders"):
        cross(x, layer_layout("sweep4", (4, 4)).permutation)
