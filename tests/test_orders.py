import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag_mamba import ZigzagScan, layer_orders, list_patterns, register_pattern
from zigzag_mamba.orders import pattern_family, zigzag_orders
from zigzag_mamba.orders.patterns import _hilbert_candidates

# docs/design.md, "Token orders": the official orders S0..S7 of a 4 x 4 grid.
OFFICIAL_4x4 = [
    [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
    [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3],
    [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8, 12, 13, 14, 15],
    [3, 7, 11, 15, 14, 10, 6, 2, 1, 5, 9, 13, 12, 8, 4, 0],
    [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
    [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],
    [15, 14, 13, 12, 8, 9, 10, 11, 7, 6, 5, 4, 0, 1, 2, 3],
    [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12],
]
PATTERNS_2D = [p for p in list_patterns() if not p.startswith("video_")]
grids = st.tuples(st.integers(1, 33), st.integers(1, 33))


def is_continuous(order: torch.Tensor, W: int) -> bool:
    r, c = order // W, order % W
    steps = (r.diff().abs() + c.diff().abs()).tolist()
    return all(s == 1 for s in steps)


def test_official_4x4_orders():
    assert zigzag_orders(4, 4).tolist() == OFFICIAL_4x4


@pytest.mark.parametrize("n", [2, 4, 6, 8, 16])
def test_even_square_grids_pair_up_as_reversals(n):
    S = zigzag_orders(n, n)
    # On even grids a snake ends in the corner where another starts.
    for a, b in [(0, 4), (1, 3), (2, 6), (5, 7)]:
        assert torch.equal(S[b], S[a].flip(0))


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_odd_square_grids_end_in_the_opposite_corner(n):
    S = zigzag_orders(n, n)
    corners = [0, n - 1, n * (n - 1), n * n - 1]
    for j in range(8):
        start = corners[j // 2]
        assert S[j, 0] == start and S[j, -1] == n * n - 1 - start


@settings(max_examples=300, deadline=None)
@given(grid=grids)
def test_every_family_is_a_set_of_exactly_invertible_permutations(grid):
    H, W = grid
    x = torch.randn(2, H * W, 3)
    for pattern in PATTERNS_2D:
        family = pattern_family(pattern, grid)
        for order in family:
            assert sorted(order.tolist()) == list(range(H * W))
        zigzag = ZigzagScan(grid, pattern, layer_idx=len(family) - 1)
        assert torch.equal(zigzag.permute(x), x[:, family[-1]])
        assert torch.equal(zigzag.unpermute(zigzag.permute(x)), x)


@settings(max_examples=300, deadline=None)
@given(grid=grids)
def test_zigzag_and_hilbert_orders_move_to_a_4_neighbour_every_step(grid):
    W = grid[1]
    for pattern in ("zigzag8", "hilbert8"):
        for order in pattern_family(pattern, grid):
            assert is_continuous(order, W), (pattern, grid, order.tolist())


@settings(max_examples=100, deadline=None)
@given(grid=grids)
def test_zigzag_starts_in_the_official_corners_on_any_grid(grid):
    H, W = grid
    S = zigzag_orders(H, W)
    corners = [0, W - 1, (H - 1) * W, H * W - 1]
    assert [int(S[j, 0]) for j in range(8)] == [corners[j // 2] for j in range(8)]
    # Row snakes walk the start row first, column snakes the start column.
    if W > 1:
        assert abs(int(S[0, 1]) - int(S[0, 0])) == 1
    if H > 1:
        assert abs(int(S[1, 1]) - int(S[1, 0])) == W


def test_non_square_zigzag_2x3():
    assert zigzag_orders(2, 3).tolist()[:2] == [[0, 1, 2, 5, 4, 3], [0, 3, 4, 1, 2, 5]]


def test_sweep_families():
    H, W = 3, 4
    rows = list(range(12))
    cols = [r * W + c for c in range(W) for r in range(H)]
    family = pattern_family("sweep4", (H, W))
    assert [o.tolist() for o in family] == [rows, rows[::-1], cols, cols[::-1]]
    assert [o.tolist() for o in pattern_family("sweep2", (H, W))] == [rows, rows[::-1]]
    assert [o.tolist() for o in pattern_family("sweep", (H, W))] == [rows]


def test_hilbert_on_a_power_of_two_square_is_the_classic_curve():
    # The 2x2 Hilbert cell and its transposed twin, from the top-left corner.
    family = pattern_family("hilbert2", (2, 2))
    assert [o.tolist() for o in family] == [[0, 2, 3, 1], [0, 1, 3, 2]]
    order = pattern_family("hilbert1", (8, 8))[0]
    # Quadrant by quadrant: a Hilbert curve finishes each 4x4 quadrant before the next.
    quadrant = (order // 8 // 4) * 2 + (order % 8) // 4
    assert [len(set(quadrant[i : i + 16].tolist())) for i in range(0, 64, 16)] == [1] * 4


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_layer_i_uses_order_i_mod_k(k):
    family = pattern_family(f"zigzag{k}", (5, 7))
    orders = layer_orders(f"zigzag{k}", (5, 7), depth=19)
    assert len(orders) == 19 and len(family) == k
    for i, order in enumerate(orders):
        assert torch.equal(order, family[i % k])
        assert torch.equal(ZigzagScan((5, 7), f"zigzag{k}", layer_idx=i).order, family[i % k])


def test_random_orders_are_the_same_in_another_process():
    code = (
        "from zigzag_mamba.orders import pattern_family;"
        "print([o.tolist() for o in pattern_family('random4', (5, 6))])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    here = [o.tolist() for o in pattern_family("random4", (5, 6))]
    assert other.stdout.strip() == str(here)
    assert len({tuple(o) for o in here}) == 4


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 3, 4), (5, 2, 2), (3, 4, 3)])
@pytest.mark.parametrize("pattern", ["video_s", "video_t", "video_sst", "video_st"])
def test_video_orders_round_trip_exactly(grid, pattern):
    T, H, W = grid
    x = torch.randn(2, T * H * W, 5)
    family = pattern_family(pattern, grid)
    for layer in range(len(family) + 2):
        zigzag = ZigzagScan(grid, pattern, layer_idx=layer)
        assert torch.equal(zigzag.unpermute(zigzag.permute(x)), x)


def test_video_spatial_layers_scan_each_frame_in_the_next_zigzag_order():
    T, H, W = 3, 4, 4
    x = torch.randn(2, T * H * W, 5)
    frames = x.view(2, T, H * W, 5)
    S = zigzag_orders(H, W)
    # video_sst: layers 0, 1 are spatial (S0, S1), layer 2 temporal, layer 3 spatial (S2)...
    for layer, s_index in [(0, 0), (1, 1), (3, 2), (4, 3)]:
        y = ZigzagScan((T, H, W), "video_sst", layer_idx=layer).permute(x)
        assert y.shape == (2 * T, H * W, 5)
        assert torch.equal(y, frames[:, :, S[s_index]].reshape(2 * T, H * W, 5))


def test_video_temporal_layers_alternate_direction():
    T, H, W = 3, 2, 2
    x = torch.randn(2, T * H * W, 5)
    per_site = x.view(2, T, H * W, 5).transpose(1, 2).reshape(2 * H * W, T, 5)
    forward = ZigzagScan((T, H, W), "video_t", layer_idx=0).permute(x)
    backward = ZigzagScan((T, H, W), "video_t", layer_idx=1).permute(x)
    assert torch.equal(forward, per_site)
    assert torch.equal(backward, per_site.flip(1))


def test_custom_orders_and_registered_patterns():
    order = torch.arange(12).flip(0)
    zigzag = ZigzagScan((3, 4), order)
    x = torch.randn(1, 12, 2)
    assert torch.equal(zigzag.permute(x), x.flip(1))
    assert "custom" in repr(zigzag)
    family = torch.stack([torch.arange(12), torch.arange(12).flip(0)])
    assert torch.equal(ZigzagScan((3, 4), family, layer_idx=3).order, family[1])
    register_pattern("test_reverse", lambda g: [torch.arange(g[0] * g[1]).flip(0)])
    assert "test_reverse" in list_patterns()
    assert torch.equal(layer_orders("test_reverse", (3, 4), 1)[0], order)
    with pytest.raises(ValueError, match="already exists"):
        register_pattern("zigzag8", lambda g: [torch.arange(g[0] * g[1])])


def test_buffers_are_non_persistent_and_follow_the_module():
    zigzag = ZigzagScan((4, 4), "zigzag8", layer_idx=5)
    assert zigzag.state_dict() == {}
    assert dict(zigzag.named_buffers()).keys() == {"order", "inverse"}
    assert torch.equal(zigzag.inverse[zigzag.order], torch.arange(16))


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        zigzag = ZigzagScan((5, 3), "hilbert8", layer_idx=2)
    assert zigzag.order.is_meta
    zigzag = zigzag.to_empty(device="cpu")  # refills the orders: no call needed
    reference = ZigzagScan((5, 3), "hilbert8", layer_idx=2)
    assert torch.equal(zigzag.order, reference.order)
    assert torch.equal(zigzag.inverse, reference.inverse)


def test_extra_repr_names_grid_pattern_and_order():
    text = repr(ZigzagScan((4, 6), "zigzag8", layer_idx=11))
    assert "grid=(4, 6)" in text and "'zigzag8'" in text and "order 3 of 8" in text
    assert "sequences=3x16" in repr(ZigzagScan((3, 4, 4), "video_s"))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ZigzagScan((4, 4), "zigzag3"), ValueError, "zigzag8"),
        (lambda: ZigzagScan((0, 4)), ValueError, ">= 1"),
        (lambda: ZigzagScan((4, -1)), ValueError, ">= 1"),
        (lambda: ZigzagScan((4, 4, 4, 4)), ValueError, r"\(T, H, W\)"),
        (lambda: ZigzagScan((2, 4, 4), "zigzag8"), ValueError, "video_"),
        (lambda: ZigzagScan((4, 4), "video_st"), ValueError, r"\(T, H, W\)"),
        (lambda: ZigzagScan((4, 4), torch.arange(16.0)), TypeError, "integer dtype"),
        (lambda: ZigzagScan((4, 4), torch.ones(16, dtype=torch.bool)), TypeError, "integer"),
        (lambda: ZigzagScan((4, 4), torch.arange(16, device="meta")), ValueError, "CPU"),
        (lambda: ZigzagScan((4, 4), torch.arange(15)), ValueError, "L = 16"),
        (lambda: ZigzagScan((4, 4), torch.zeros(16, dtype=torch.long)), ValueError, "repeats"),
        (lambda: ZigzagScan((4, 4), torch.arange(1, 17)), ValueError, "out-of-range"),
        (lambda: ZigzagScan((4, 4), "zigzag8").permute(torch.randn(1, 15, 2)), ValueError, "16"),
        (
            lambda: ZigzagScan((2, 2, 2), "video_s").unpermute(torch.randn(3, 4, 1)),
            ValueError,
            "B*2",
        ),
        (lambda: layer_orders("zigzag8", (4, 4), -1), ValueError, "depth"),
        (lambda: ZigzagScan((4, 4), 3.5), TypeError, "pattern"),
    ],
)
def test_errors_say_what_was_expected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unknown_pattern_lists_valid_names():
    with pytest.raises(ValueError) as info:
        layer_orders("snake", 4, 1)
    for name in ("zigzag8", "hilbert8", "sweep4", "random8", "video_sst"):
        assert name in str(info.value)


def _distinct(pattern: str, grid: tuple[int, int]) -> int:
    return len({tuple(order.tolist()) for order in pattern_family(pattern, grid)})


def _is_power_of_two_beside_one_more(h: int, w: int) -> bool:
    """2^a x (2^b + 1): the grids, with sides of at least 5, on which every generalised Hilbert
    curve tried is its own mirror image (docs/orders.md)."""
    return any(a & (a - 1) == 0 and (b - 1) & (b - 2) == 0 for a, b in ((h, w), (w, h)))


@given(st.tuples(st.integers(2, 33), st.integers(2, 33)))
@settings(max_examples=60, deadline=None)
def test_families_have_distinct_orders_where_the_grid_allows(grid):
    h, w = grid
    assert _distinct("zigzag8", grid) == 8
    assert _distinct("sweep4", grid) == 4
    if h * w >= 8:
        assert _distinct("random8", grid) == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distinct = _distinct("hilbert8", grid)
    if distinct < 8:  # only ever said with a warning naming the grid and the count
        assert len(caught) == 1, grid
        assert f"{distinct} distinct orders on grid {grid}" in str(caught[0].message)
    else:
        assert not caught
    if min(grid) >= 5 and not _is_power_of_two_beside_one_more(h, w):
        assert distinct == 8, grid


@pytest.mark.parametrize("grid", [(9, 12), (6, 7), (7, 10), (12, 9), (5, 5), (16, 16), (10, 14)])
def test_hilbert8_has_8_distinct_orders_whatever_the_parity_of_the_sides(grid):
    assert _distinct("hilbert8", grid) == 8
    assert _distinct("hilbert2", grid) == 2


@settings(max_examples=60, deadline=None)
@given(grid=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_every_hilbert_candidate_is_a_continuous_path_through_every_token(grid):
    H, W = grid
    for order in _hilbert_candidates(H, W):
        assert sorted(order.tolist()) == list(range(H * W))
        assert is_continuous(order, W), (grid, order.tolist())


@given(st.integers(2, 33))
@settings(max_examples=20, deadline=None)
def test_a_line_of_tokens_has_two_directions(length):
    for pattern in ("zigzag8", "hilbert8", "sweep4"):
        assert _distinct(pattern, (1, length)) == 2
        assert _distinct(pattern, (length, 1)) == 2


def test_a_registered_builder_may_return_one_order():
    register_pattern("reversed_raster_once", lambda grid: torch.arange(grid[0] * grid[1]).flip(0))
    assert torch.equal(pattern_family("reversed_raster_once", (2, 3))[0], torch.arange(6).flip(0))


@pytest.mark.parametrize("layer_idx", [1.5, None, -1, True, "3"])
def test_layer_idx_must_be_a_non_negative_int(layer_idx):
    with pytest.raises(ValueError, match="layer_idx must be a non-negative int"):
        ZigzagScan((4, 4), "zigzag8", layer_idx)


@pytest.mark.parametrize("grid", [(4.0, 4), (True, 4), 4.0, "44", (4, None)])
def test_grid_entries_must_be_ints(grid):
    with pytest.raises(ValueError, match="grid must be an int"):
        ZigzagScan(grid)


def test_numpy_ints_are_ints():
    assert ZigzagScan((np.int64(4), np.int32(6))).grid == (4, 6)


def test_a_meta_module_with_real_tokens_is_a_clear_error():
    # It used to run the shape-only kernel and return uninitialised memory.
    zigzag = ZigzagScan((4, 4), device="meta")
    with pytest.raises(ValueError, match=r"on meta but the tokens on cpu.*to_empty"):
        zigzag.permute(torch.randn(1, 16, 2))
    with pytest.raises(ValueError, match="on meta but the tokens on cpu"):
        zigzag.unpermute(torch.randn(1, 16, 2))


@pytest.mark.parametrize("move", ["to_empty", "to", "half"])
def test_every_move_refills_the_orders(move):
    reference = ZigzagScan((4, 4), "zigzag8", layer_idx=3)
    zigzag = ZigzagScan((4, 4), "zigzag8", layer_idx=3, device="meta").to_empty(device="cpu")
    zigzag.order.fill_(7)  # as if to_empty() had left this memory
    moved = {
        "to_empty": lambda m: m.to_empty(device="cpu"),
        "to": lambda m: m.to("cpu"),
        "half": lambda m: m.half(),
    }[move](zigzag)
    assert torch.equal(moved.order, reference.order)
    assert torch.equal(moved.inverse, reference.inverse)
