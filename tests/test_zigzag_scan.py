"""ZigzagScan with the grid given per call, its cache of orders, and prefix tokens."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag_mamba import ZigzagScan
from zigzag_mamba.orders import GRID_CACHE_SIZE, layer_orders, with_prefix


@pytest.mark.parametrize("pattern", ["zigzag8", "hilbert4", "sweep4", "random2"])
def test_a_grid_per_call_gives_the_orders_of_a_module_built_for_it(pattern):
    anywhere = ZigzagScan(None, pattern, layer_idx=5)
    for grid in [(4, 6), (7, 3), (1, 5)]:
        fixed = ZigzagScan(grid, pattern, layer_idx=5)
        x = torch.randn(2, grid[0] * grid[1], 3)
        assert torch.equal(anywhere.permute(x, grid=grid), fixed.permute(x))
        assert torch.equal(anywhere.unpermute(anywhere.permute(x, grid), grid), x)
        order, inverse = anywhere.orders_for(x, grid)
        assert torch.equal(order, layer_orders(pattern, grid, 6)[5])
        assert torch.equal(inverse, torch.argsort(order))


def test_a_module_built_for_one_grid_takes_others_per_call():
    zigzag = ZigzagScan((4, 4), "zigzag8", layer_idx=3)
    x = torch.randn(2, 12, 5)
    assert torch.equal(zigzag.permute(x, grid=(3, 4)), x[:, layer_orders("zigzag8", (3, 4), 4)[3]])
    # The default grid still uses the buffers; the same grid given explicitly too.
    x16 = torch.randn(2, 16, 5)
    assert torch.equal(zigzag.permute(x16, grid=(4, 4)), zigzag.permute(x16))
    assert list(zigzag._grid_cache) == [((3, 4), torch.device("cpu"))]


def test_video_grids_per_call():
    anywhere = ZigzagScan(None, "video_st", layer_idx=1)
    fixed = ZigzagScan((2, 3, 4), "video_st", layer_idx=1)
    x = torch.randn(2, 24, 3)
    y = anywhere.permute(x, grid=(2, 3, 4))
    assert y.shape == (2 * 12, 2, 3)
    assert torch.equal(y, fixed.permute(x))
    assert torch.equal(anywhere.unpermute(y, grid=(2, 3, 4)), x)


def test_orders_are_built_once_per_grid_and_the_cache_is_bounded(monkeypatch):
    zigzag = ZigzagScan(None, "zigzag8", layer_idx=2)
    built = []
    layout = zigzag._cpu_layout
    monkeypatch.setattr(zigzag, "_cpu_layout", lambda grid: built.append(grid) or layout(grid))
    x = torch.randn(1, 12, 2)
    first = zigzag.orders_for(x, (3, 4))
    for grid in [(3, 4), [3, 4], (3, 4)]:
        again = zigzag.orders_for(x, grid)
        assert again[0] is first[0] and again[1] is first[1]
    assert built == [(3, 4)]
    for n in range(1, GRID_CACHE_SIZE + 3):
        zigzag.permute(torch.randn(1, n, 2), grid=(1, n))
    assert len(zigzag._grid_cache) == GRID_CACHE_SIZE


def test_the_cache_is_per_device():
    zigzag = ZigzagScan(None, "zigzag8")
    zigzag.permute(torch.randn(1, 6, 2), grid=(2, 3))
    zigzag.permute(torch.randn(1, 6, 2, device="meta"), grid=(2, 3))
    assert {device.type for _, device in zigzag._grid_cache} == {"cpu", "meta"}


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
    from zigzag_mamba.orders.zigzag import _grid_orders

    args = (torch.empty(0), "hilbert8", 3, [3, 4], 1, "middle")
    torch.library.opcheck(_grid_orders, args)
    order, inverse = _grid_orders(*args)
    zigzag = ZigzagScan((3, 4), "hilbert8", 3, num_prefix_tokens=1, prefix_position="middle")
    assert torch.equal(order, zigzag.order) and torch.equal(inverse, zigzag.inverse)
