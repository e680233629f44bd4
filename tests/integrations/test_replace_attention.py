"""replace_attention's contract, whatever the host library: what it refuses, and the grid
tracker that gives each mixer call the grid of its own forward."""

import pickle
import threading

import pytest
import torch
from torch import nn

from zigzag_mamba.integrations import GridTracker, replace_attention


@pytest.mark.parametrize(
    "model",
    [
        nn.Linear(4, 4),
        nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()),
        nn.TransformerEncoderLayer(8, 2),
    ],
)
def test_a_model_without_vit_attention_is_refused(model):
    with pytest.raises(TypeError, match="model: found no attention of the expected shape"):
        replace_attention(model)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        replace_attention("vit_base_patch16_224")


def test_the_patch_convolution_starts_each_forward_at_its_grid():
    tracker = GridTracker((2, 2))
    assert tracker.grid == (2, 2)
    conv = nn.Conv2d(1, 4, 2, stride=2)
    conv.register_forward_hook(tracker)
    conv(torch.randn(1, 1, 6, 10))
    assert tracker.grid == (3, 5)


def test_a_block_input_seen_again_brings_back_its_grid():
    tracker, norm = GridTracker((2, 2)), nn.LayerNorm(4)
    norm.register_forward_pre_hook(tracker.enter, with_kwargs=True)
    conv = nn.Conv2d(1, 4, 2, stride=2)
    conv.register_forward_hook(tracker)
    first = conv(torch.randn(1, 1, 4, 8)).flatten(2).transpose(1, 2)  # grid (2, 4)
    norm(first)
    second = conv(torch.randn(1, 1, 8, 4)).flatten(2).transpose(1, 2)  # grid (4, 2)
    norm(second)
    assert tracker.grid == (4, 2)
    norm(first)  # a recompute of the first forward's block
    assert tracker.grid == (2, 4)
    norm(first.detach())  # a reentrant recompute: a detached view of the same memory
    assert tracker.grid == (2, 4)


def test_each_thread_reads_its_own_grid_and_copies_start_afresh():
    tracker, grids = GridTracker((1, 1)), {}
    conv = nn.Conv2d(1, 1, 1)
    conv.register_forward_hook(tracker)
    barrier = threading.Barrier(2)

    def run(size):
        conv(torch.randn(1, 1, *size))
        barrier.wait()  # both have run their forward before either reads
        grids[size] = tracker.grid

    threads = [threading.Thread(target=run, args=(s,)) for s in [(3, 5), (5, 3)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert grids == {(3, 5): (3, 5), (5, 3): (5, 3)}
    assert tracker.grid == (1, 1)  # this thread ran no forward
    assert pickle.loads(pickle.dumps(tracker)).grid == (1, 1)
