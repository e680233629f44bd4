"""ZigMaBlock and ZigMaMixer with the grid given per call, and with prefix tokens."""

import pytest
import torch
from helpers import checkpointed_gradients_match, randomise

from zigzag_mamba import CONFIGS, ZigMaBackbone
from zigzag_mamba.modules import ZigMaBlock, ZigMaMixer
from zigzag_mamba.orders import layer_orders, with_prefix

DIM = 32


def run(block, x, c, context, **kwargs):
    """Output and the gradients of x and of every parameter, for one fixed loss."""
    x = x.clone().requires_grad_()
    block.zero_grad()
    out = block(x, c, context, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return [out, x.grad, *[p.grad for p in block.parameters()]]


@pytest.mark.parametrize(
    ("grid", "pattern", "context_dim"),
    [((4, 6), "zigzag8", None), ((4, 6), "hilbert4", 16), ((2, 3, 4), "video_sst", None)],
)
@pytest.mark.parametrize("layer_idx", [0, 5])
def test_a_grid_per_call_is_bit_identical_to_the_fixed_grid_block(
    grid, pattern, context_dim, layer_idx
):
    fixed = ZigMaBlock(DIM, grid, pattern, layer_idx, context_dim=context_dim)
    randomise(fixed, layer_idx)
    anywhere = ZigMaBlock(DIM, None, pattern, layer_idx, context_dim=context_dim)
    anywhere.load_state_dict(fixed.state_dict())
    x, c = torch.randn(2, 24, DIM), torch.randn(2, DIM)
    context = None if context_dim is None else torch.randn(2, 3, context_dim)
    expected = run(fixed, x, c, context)
    for block, kwargs in [(anywhere, {"grid": grid}), (fixed, {"grid": grid}), (fixed, {})]:
        got = run(block, x, c, context, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_block_built_for_one_grid_runs_another():
    square = ZigMaBlock(DIM, (4, 4), "zigzag8", 3)
    randomise(square, 1)
    wide = ZigMaBlock(DIM, (3, 8), "zigzag8", 3)
    wide.load_state_dict(square.state_dict())
    x, c = torch.randn(2, 24, DIM), torch.randn(2, DIM)
    assert torch.equal(square(x, c, grid=(3, 8)), wide(x, c))
    assert square(torch.randn(2, 16, DIM), c).shape == (2, 16, DIM)


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("position", ["end", "middle", "start"])
def test_prefix_tokens_by_hand(position):
    grid, k, layer_idx = (3, 4), 2, 1
    block = ZigMaBlock(
        DIM, None, "zigzag8", layer_idx, num_prefix_tokens=k, prefix_position=position
    )
    randomise(block, 2)
    x = torch.randn(2, k + 12, DIM)
    order = with_prefix(layer_orders("zigzag8", grid, 2)[1], k, position)
    n = rms_norm(x, block.norm.weight)
    expected = x + n + block.mixer(n[:, order])[:, torch.argsort(order)]
    torch.testing.assert_close(block(x, grid=grid), expected)


def prefix_dependence(module, x, k, **kwargs):
    """For each grid token, whether any prefix token's output depends on it."""
    x = x.clone().requires_grad_()
    module(x, **kwargs)[:, :k].sum().backward()
    return (x.grad[:, k:] != 0).any(dim=(0, 2))


def test_at_the_end_a_causal_scan_gives_the_prefix_the_whole_grid():
    grid, k = (4, 5), 2
    for layer_idx in range(8):
        mixer = ZigMaMixer(DIM, grid, "zigzag8", layer_idx, num_prefix_tokens=k)
        assert prefix_dependence(mixer, torch.randn(2, k + 20, DIM), k).all()


def test_in_the_middle_a_causal_scan_gives_the_prefix_the_first_half_only():
    grid, k = (4, 5), 1
    order = layer_orders("zigzag8", grid, 3)[2]
    mixer = ZigMaMixer(DIM, grid, "zigzag8", 2, num_prefix_tokens=k, prefix_position="middle")
    seen = prefix_dependence(mixer, torch.randn(2, k + 20, DIM), k)
    expected = torch.zeros(20, dtype=torch.bool)
    expected[order[:10]] = True
    assert torch.equal(seen, expected)
    # A bidirectional mixer reads the other half in its reversed scan.
    both = ZigMaMixer(
        DIM,
        grid,
        "zigzag8",
        2,
        mixer="bidirectional",
        num_prefix_tokens=k,
        prefix_position="middle",
    )
    assert prefix_dependence(both, torch.randn(2, k + 20, DIM), k).all()


def test_at_the_start_a_causal_scan_gives_the_prefix_nothing():
    mixer = ZigMaMixer(DIM, (4, 5), "zigzag8", 0, num_prefix_tokens=1, prefix_position="start")
    assert not prefix_dependence(mixer, torch.randn(2, 21, DIM), 1).any()


def test_the_output_keeps_the_input_token_order():
    # A mixer that only looks at each token (no conv, no state mixing across tokens) is the
    # identity on the order: prefix and grid tokens come back where they were.
    mixer = ZigMaMixer(DIM, None, "zigzag8", 3, num_prefix_tokens=3)
    mixer.mixer = torch.nn.Identity()
    x = torch.randn(2, 3 + 20, DIM)
    assert torch.equal(mixer(x, grid=(4, 5)), x)


def test_prefix_tokens_without_a_pattern_are_read_after_the_raster_tokens():
    block = ZigMaBlock(DIM, (2, 3), pattern=None, num_prefix_tokens=1)
    assert block.zigzag.pattern == "sweep"
    assert block.zigzag.order.tolist() == [1, 2, 3, 4, 5, 6, 0]
    assert ZigMaBlock(DIM, (2, 3), pattern=None).zigzag is None


def test_the_mixer_is_the_blocks_mixer_path():
    block = ZigMaBlock(DIM, None, "zigzag8", 4, adaln=False, num_prefix_tokens=1)
    randomise(block, 3)
    mixer = ZigMaMixer(DIM, None, "zigzag8", 4, num_prefix_tokens=1)
    mixer.mixer.load_state_dict(block.mixer.state_dict())
    x = torch.randn(2, 1 + 12, DIM)
    n = block.norm(x)
    torch.testing.assert_close(block(x, grid=(3, 4)), x + n + mixer(n, grid=(3, 4)))
    plain = ZigMaMixer(DIM, pattern=None)
    plain.mixer.load_state_dict(block.mixer.state_dict())
    assert torch.equal(plain(n, grid=(13, 1)), block.mixer(n))


def test_compiles_without_graph_breaks_and_recompiles_for_a_new_grid():
    block = ZigMaBlock(DIM, None, "zigzag8", 3, num_prefix_tokens=1)
    randomise(block, 5)
    c = torch.randn(2, DIM)
    x1, x2 = torch.randn(2, 1 + 24, DIM), torch.randn(2, 1 + 20, DIM)
    explanation = torch._dynamo.explain(block)(x1, c, grid=(4, 6))
    assert explanation.graph_break_count == 0
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for x, grid in [(x1, (4, 6)), (x2, (5, 4)), (x1, (4, 6))]:
        x = x.clone().requires_grad_()
        out = compiled(x, c, grid=grid)
        out.square().sum().backward()
        x_eager = x.detach().clone().requires_grad_()
        ref = block(x_eager, c, grid=grid)
        ref.square().sum().backward()
        assert torch.equal(out, ref)
        torch.testing.assert_close(x.grad, x_eager.grad)


@pytest.mark.parametrize(
    ("block_kwargs", "tokens", "grid", "match"),
    [
        ({}, 24, (4, 4), r"\(B, 16, C\) for grid \(4, 4\)"),
        ({"grid": (4, 4)}, 24, None, r"\(B, 16, C\) for grid \(4, 4\)"),
        ({"num_prefix_tokens": 1}, 24, (4, 6), r"\(B, 25, C\) for 1 prefix tokens \+ 24"),
        ({"num_prefix_tokens": 4}, 4, (2, 2), "num_prefix_tokens=4 must be less than"),
        ({"pattern": None}, 24, (4, 4), r"\(B, 16, C\) for grid \(4, 4\)"),
        ({}, 24, (4, "6"), "grid must be an int"),
    ],
)
def test_bad_grids_and_prefix_counts_are_named(block_kwargs, tokens, grid, match):
    block = ZigMaBlock(DIM, **block_kwargs)
    with pytest.raises(ValueError, match=match):
        block(torch.randn(2, tokens, DIM), grid=grid)


@pytest.mark.parametrize("value", [-1, 1.5, None])
def test_num_prefix_tokens_is_checked_at_construction(value):
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0"):
        ZigMaBlock(DIM, (4, 4), num_prefix_tokens=value)
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0"):
        ZigMaMixer(DIM, (4, 4), num_prefix_tokens=value)


def test_the_backbone_passes_its_grid_down(monkeypatch):
    model = ZigMaBackbone(input_size=(8, 12), in_channels=2, **CONFIGS["ZigMa-T/2"])
    seen = []
    for block in model.blocks:
        forward = block.forward_residual
        monkeypatch.setattr(
            block, "forward_residual", lambda *a, f=forward: seen.append(a[-1]) or f(*a)
        )
    model(torch.randn(1, 2, 8, 12), torch.rand(1))
    assert seen == [(4, 6)] * len(model.blocks)


def test_the_backbone_takes_diffusers_gradient_checkpointing_switch():
    torch.manual_seed(0)
    model = ZigMaBackbone(input_size=8, in_channels=2, **CONFIGS["ZigMa-T/2"])
    randomise(model, 6)
    x, t = torch.randn(2, 2, 8, 8), torch.rand(2)

    def switch_on(m, recompute):
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = recompute

    calls = checkpointed_gradients_match(model, lambda m: m(x, t).square().sum(), switch_on)
    assert model.grad_checkpointing and len(calls) == len(model.blocks)


def test_a_block_builds_from_its_width_alone():
    x = torch.randn(2, 24, DIM)
    assert ZigMaBlock(DIM)(x, grid=(4, 6)).shape == x.shape
    block = ZigMaBlock(DIM, pattern="hilbert8", layer_idx=2)
    assert block.zigzag.pattern == "hilbert8" and block.zigzag.grid is None
    assert block(x, grid=(6, 4)).shape == x.shape
