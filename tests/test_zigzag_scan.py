"""ZigzagScan with the grid given per call, its cache of orders, and prefix tokens."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag_mamba import ZigzagScan, register_pattern
from zigzag_mamba.orders import CACHE_SIZE, layer_layout, layer_orders, with_prefix
from zigzag_mamba.orders.layout import _grid_orders, _layout


@pytest.mark.parametrize("pattern", ["zigzag8", "hilbert4", "sweep4", "random2"])
def test_a_grid_per_call_gives_the_orders_of_a_module_built_for_it(pattern):
    anywhere = ZigzagScan(None, pattern, layer_idx=5)
    for grid in [(4, 6), (7, 3), (1, 5)]:
        fixed = ZigzagScan(grid, pattern, layer_idx=5)
        x = torch.randn(2, grid[0] * grid[1], 3)
        assert torch.equal(anywhere.permute(x, grid=grid), fixed.permute(x))
        assert torch.equal(anywhere.unpermute(anywhere.permute(x, grid), grid), x)
        (order, inverse), seq_len = anywhere.layout(x, grid)
        assert torch.equal(order, layer_orders(pattern, grid, 6)[5])
        assert torch.equal(inverse, torch.argsort(order)) and seq_len == grid[0] * grid[1]


def test_a_module_built_for_one_grid_takes_others_per_call():
    zigzag = ZigzagScan((4, 4), "zigzag8", layer_idx=3)
    x = torch.randn(2, 12, 5)
    assert torch.equal(zigzag.permute(x, grid=(3, 4)), x[:, layer_orders("zigzag8", (3, 4), 4)[3]])
    # The default grid still uses the buffers; the same grid given explicitly too.
    x16 = torch.randn(2, 16, 5)
    assert torch.equal(zigzag.permute(x16, grid=(4, 4)), zigzag.permute(x16))
    assert zigzag.layout(x16, grid=(4, 4)).permutation.order is zigzag.order


def test_video_grids_per_call():
    anywhere = ZigzagScan(None, "video_st", layer_idx=1)
    fixed = ZigzagScan((2, 3, 4), "video_st", layer_idx=1)
    x = torch.randn(2, 24, 3)
    y = anywhere.permute(x, grid=(2, 3, 4))
    assert y.shape == (2 * 12, 2, 3)
    assert torch.equal(y, fixed.permute(x))
    assert torch.equal(anywhere.unpermute(y, grid=(2, 3, 4)), x)


def test_a_layout_is_built_once_and_the_cache_is_bounded(monkeypatch):
    from zigzag_mamba.orders import layout as layout_module

    _layout.cache_clear()
    built = []
    family = layout_module.pattern_family
    monkeypatch.setattr(
        layout_module, "pattern_family", lambda p, g: built.append(g) or family(p, g)
    )
    zigzag, other = ZigzagScan(None, "zigzag8", layer_idx=2), ZigzagScan(None, "zigzag8", 2)
    x = torch.randn(1, 12, 2)
    first = zigzag.layout(x, (3, 4)).permutation
    for module, grid in [(zigzag, (3, 4)), (zigzag, [3, 4]), (other, (3, 4))]:
        assert module.layout(x, grid).permutation.order is first.order
    assert layer_layout("zigzag8", (3, 4), 2).permutation.inverse is first.inverse
    assert built == [(3, 4)]
    for n in range(1, CACHE_SIZE + 3):
        zigzag.permute(torch.randn(1, n, 2), grid=(1, n))
    assert _layout.cache_info().currsize == CACHE_SIZE


def test_the_cache_is_per_device():
    zigzag = ZigzagScan(None, "zigzag8")
    cpu = zigzag.layout(torch.randn(1, 6, 2), grid=(2, 3)).permutation
    meta = zigzag.layout(torch.randn(1, 6, 2, device="meta"), grid=(2, 3)).permutation
    assert cpu.order.device.type == "cpu" and meta.order.device.type == "meta"


def test_a_replaced_pattern_is_not_served_from_the_cache():
    register_pattern("replaced_later", lambda grid: torch.arange(grid[0] * grid[1]))
    assert layer_layout("replaced_later", (2, 3)).permutation.order.tolist() == [0, 1, 2, 3, 4, 5]
    register_pattern(
        "replaced_later", lambda grid: torch.arange(grid[0] * grid[1]).flip(0), overwrite=True
    )
    assert layer_layout("replaced_later", (2, 3)).permutation.order.tolist() == [5, 4, 3, 2, 1, 0]


def test_prefix_tokens_are_read_at_their_slot_and_come_back_in_place():
    grid, k = (3, 4), 2
    patch_order = layer_orders("zigzag8", grid, 2)[1]
    x = torch.randn(2, k + 12, 3)
    for position, slot in [("end", 12), ("middle", 6), ("start", 0)]:
        zigzag = ZigzagScan(grid, "zigzag8", 1, num_prefix_tokens=k, prefix_position=position)
        y = zigzag.permute(x)
        assert torch.equal(y[:, slot : slot + k], x[:, :k])  # the prefix, in its own order
        grid_part = torch.cat([y[:, :slot], y[:, slot + k :]], dim=1)
        assert torch.equal(grid_part, x[:, k:][:, patch_order])
        assert torch.equal(zigzag.unpermute(y), x)
        per_call = ZigzagScan(None, "zigzag8", 1, num_prefix_tokens=k, prefix_position=position)
        assert torch.equal(per_call.permute(x, grid), y)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.integers(0, 5), st.sampled_from(["end", "middle", "start"]))
def test_with_prefix_is_a_permutation(n, k, position):
    order = torch.randperm(n)
    extended = with_prefix(order, k, position)
    assert sorted(extended.tolist()) == list(range(n + k))


def test_a_module_without_a_default_grid():
    zigzag = ZigzagScan(None, "zigzag8", layer_idx=1)
    assert zigzag.order is None and zigzag.grid is None
    assert "grid=given per call" in repr(zigzag)
    zigzag.init_non_persistent_buffers()  # nothing to fill
    with pytest.raises(ValueError, match=r"without a grid: pass the tokens' grid=\(H, W\)"):
        zigzag.permute(torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="without a grid"):
        zigzag.unpermute(torch.randn(1, 4, 2))
    assert zigzag.state_dict() == {}


def test_deepcopy_and_pickle_keep_the_cache_usable():
    zigzag = ZigzagScan(None, "hilbert8", layer_idx=4, num_prefix_tokens=1)
    x = torch.randn(2, 13, 3)
    y = zigzag.permute(x, (3, 4))
    for clone in (copy.deepcopy(zigzag), pickle.loads(pickle.dumps(zigzag))):
        assert torch.equal(clone.permute(x, (3, 4)), y)


@pytest.mark.parametrize(
    ("kwargs", "call", "error", "match"),
    [
        ({"grid": (4, 4)}, ((1, 12), None), ValueError, r"\(B, 16, C\) for grid \(4, 4\)"),
        ({}, ((1, 12), (4, 4)), ValueError, r"\(B, 16, C\) for grid \(4, 4\)"),
        (
            {"num_prefix_tokens": 1},
            ((1, 17), (4, 3)),
            ValueError,
            r"\(B, 13, C\) for 1 prefix tokens \+ 12 of grid \(4, 3\)",
        ),
        (
            {"num_prefix_tokens": 3},
            ((1, 3), (1, 1)),
            ValueError,
            "num_prefix_tokens=3 must be less",
        ),
        ({}, ((1, 12), (3, 4.0)), ValueError, "grid must be an int"),
        ({"num_prefix_tokens": -1}, None, ValueError, "num_prefix_tokens must be an int >= 0"),
        ({"num_prefix_tokens": 1.0}, None, ValueError, "num_prefix_tokens must be an int >= 0"),
        ({"prefix_position": "first"}, None, ValueError, "prefix_position must be one of"),
        ({"pattern": "zigzg8"}, None, ValueError, "unknown scan pattern 'zigzg8'"),
        ({"pattern": 8}, None, TypeError, "pattern must be a name"),
        (
            {"pattern": "video_st", "num_prefix_tokens": 1},
            None,
            ValueError,
            "splits them per frame and per pixel",
        ),
    ],
)
def test_bad_grids_and_prefixes_are_named(kwargs, call, error, match):
    with pytest.raises(error, match=match):
        zigzag = ZigzagScan(**{"grid": None, **kwargs})
        (batch, tokens), grid = call
        zigzag.permute(torch.randn(batch, tokens, 2), grid=grid)


def test_the_grid_orders_op_passes_opcheck_and_matches_the_module():
    args = (torch.empty(0), "hilbert8", 3, [3, 4], 1, "middle", 1)
    torch.library.opcheck(_grid_orders, args)
    order, inverse = _grid_orders(*args)
    zigzag = ZigzagScan((3, 4), "hilbert8", 3, num_prefix_tokens=1, prefix_position="middle")
    assert torch.equal(order, zigzag.order) and torch.equal(inverse, zigzag.inverse)
