"""replace_attention on timm's own models, with timm's own features.

timm needs torchvision, which does not import beside the CPU-only torch 2.13 of the main test
run; CI runs this file in a second virtual environment (torch 2.14.1, torchvision 0.29.1, timm),
as ``python -m pytest -m timm tests/integrations``.
"""

import copy
import inspect
import threading

import pytest
import torch
from helpers import capture_mixer_calls, check_mixer_calls, gradients, randomise
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")

from timm.layers import Attention  # noqa: E402
from timm.models import load_checkpoint  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

from zigzag_mamba.integrations import ViTMixer, replace_attention  # noqa: E402

pytestmark = pytest.mark.timm


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=3)
    return VisionTransformer(**{**options, "num_heads": 2, **kwargs})


def tiny(name: str, **kwargs):
    """A small random model of a timm architecture (no weights are downloaded)."""
    torch.manual_seed(0)
    options = dict(pretrained=False, img_size=32, num_classes=3)
    try:
        return timm.create_model(name, **options, embed_dim=32, depth=2, num_heads=2, **kwargs)
    except TypeError:  # an architecture with other size arguments: its own defaults
        return timm.create_model(name, **options, **kwargs)


def mixer_grids(model):
    """The grid each ZigMa mixer ran with, recorded at its next call."""
    seen = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda m, a, o: seen.append(m.tracker.grid))
    return seen


@pytest.mark.parametrize(
    ("kwargs", "prefix"),
    [({}, 1), ({"reg_tokens": 4}, 5), ({"class_token": False, "global_pool": "avg"}, 0)],
)
def test_timm_vision_transformer_and_every_parameter_gets_a_gradient(kwargs, prefix):
    model = replace_attention(tiny_vit(**kwargs), pattern="zigzag8")
    mixers = [block.attn for block in model.blocks]
    assert all(isinstance(m, ViTMixer) and m.kind == "timm" for m in mixers)
    assert [m.mixer.layer_idx for m in mixers] == [0, 1, 2]
    assert {m.mixer.zigzag.num_prefix_tokens for m in mixers} == {prefix}
    grids = mixer_grids(model)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and grids == [(8, 8)] * 3
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# Each architecture with the outcome the tests measure; docs/integrations.md shows this table.
FAMILIES = {
    "vit_tiny_patch16_224": ("supported", 1),
    "vit_little_patch16_reg1_gap_256": ("supported", 1),  # one register, no class token
    "vit_medium_patch16_gap_256": ("supported", 0),
    "vit_base_patch16_siglip_224": ("supported", 0),
    "deit3_small_patch16_224": ("supported", 1),
    "deit_tiny_distilled_patch16_224": ("supported", 2),
    "flexivit_small": ("supported", 1),
    "cait_xxs24_224": ("supported", 0),  # the class token joins after the patch blocks
    "eva02_tiny_patch14_224": ("refused", "EvaAttention\\(x, rope"),
    "beit_base_patch16_224": ("refused", "shared_rel_pos_bias"),
    "xcit_nano_12_p16_224": ("refused", "neither a Conv2d .proj nor a .grid_size"),
    "pit_ti_224": ("refused", "found no attention of the expected shape in PoolingVisionTrans"),
    "mvitv2_tiny": ("refused", "found no attention of the expected shape in MultiScaleVit"),
    "twins_svt_small": ("refused", "found no attention of the expected shape in Twins"),
    "levit_128s": ("refused", "found no attention of the expected shape in Levit"),
    "crossvit_tiny_240": ("refused", "found no attention of the expected shape in CrossVit"),
    "tnt_s_patch16_224": ("refused", "found no attention of the expected shape in TNT"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_is_converted_or_refused_with_its_reason(name):
    status, detail = FAMILIES[name]
    model = tiny(name)
    if status == "refused":
        with pytest.raises((TypeError, ValueError), match=detail):
            replace_attention(model)
        return
    replace_attention(model)
    mixers = [m for m in model.modules() if isinstance(m, ViTMixer)]
    assert mixers and {m.mixer.zigzag.num_prefix_tokens for m in mixers} == {detail}
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(m.mixer.mixer.in_proj.weight.grad is not None for m in mixers)


def test_cait_blocks_read_exactly_the_patch_grid():
    model = replace_attention(tiny("cait_xxs24_224"))
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(torch.randn(1, 3, 32, 32))
    grid = model.patch_embed.grid_size
    assert seen == [grid[0] * grid[1]] * len(model.blocks)


def test_dynamic_and_non_square_image_sizes():
    model = replace_attention(tiny_vit(dynamic_img_size=True, reg_tokens=2))
    grids = mixer_grids(model)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 10)
    assert model(torch.randn(1, 3, 24, 16)).shape == (1, 10)
    assert grids == [(8, 12)] * 3 + [(6, 4)] * 3
    wide = replace_attention(tiny_vit(img_size=(16, 40)))
    assert wide(torch.randn(1, 3, 16, 40)).shape == (1, 10)


def test_grad_checkpointing_over_two_image_sizes_gives_the_plain_gradients():
    # Equal token counts, other grids: the recompute must read each forward's own grid.
    model = replace_attention(tiny_vit(dynamic_img_size=True, drop_rate=0.0)).train()
    images = [torch.randn(2, 3, 32, 48), torch.randn(2, 3, 48, 32)]
    plain = gradients(model, model, images)
    model.set_grad_checkpointing(True)
    checkpointed = gradients(model, model, images)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def test_two_threads_at_two_image_sizes():
    model = replace_attention(tiny_vit(dynamic_img_size=True)).eval()
    images = [torch.randn(2, 3, 32, 48), torch.randn(2, 3, 48, 32)]
    with torch.no_grad():
        alone = [model(x) for x in images]
    results, barrier = [None, None], threading.Barrier(2)

    def run(k):
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                results[k] = model(images[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(results, alone, strict=True))


def test_intermediates_and_features_only():
    model = replace_attention(tiny_vit(reg_tokens=1))
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 2 + 64, 64)
    _, intermediates = model.forward_intermediates(torch.randn(2, 3, 32, 32))
    assert len(intermediates) == 3 and intermediates[0].shape == (2, 64, 8, 8)
    torch.manual_seed(0)
    extractor = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
        depth=3, num_heads=2, features_only=True, out_indices=(1, 2),
    )  # fmt: skip
    replace_attention(extractor)
    maps = extractor(torch.randn(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8)] * 2


def test_fx_feature_extraction_keeps_the_mixer_whole():
    from timm.models._features_fx import create_feature_extractor

    model = replace_attention(tiny_vit()).eval()
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "mid"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mid = extractor(x)["mid"]
        expected = model.blocks[1](model.blocks[0](model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(mid, expected)


def test_compile():
    model = replace_attention(tiny_vit()).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_checkpoint_of_converted_weights(tmp_path, suffix):
    model = replace_attention(tiny_vit(reg_tokens=2), pattern="sweep2").eval()
    path = tmp_path / f"zigma_vit{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), path)
    again = replace_attention(tiny_vit(reg_tokens=2), pattern="sweep2").eval()
    for p in again.parameters():
        p.data.zero_()
    load_checkpoint(again, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_masks_are_refused():
    model = replace_attention(tiny_vit())
    block = model.blocks[0]
    if "attn_mask" not in inspect.signature(block.forward).parameters:
        pytest.skip("this timm's blocks take no attention mask")
    mask = torch.ones(65, 65, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"attn_mask: .* cannot honour attn_mask"):
        block(torch.randn(1, 65, 64), attn_mask=mask)


def test_a_created_model():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5, reg_tokens=4
    )
    replace_attention(model, d_state=8)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert model.blocks[11].attn.mixer.layer_idx == 11


def test_every_mixer_call_is_the_stand_alone_mixer_at_each_size():
    model = replace_attention(tiny_vit(dynamic_img_size=True, reg_tokens=2), d_state=8)
    mixers = [block.attn for block in model.blocks]
    for size, grid in [((32, 32), (8, 8)), ((32, 48), (8, 12)), ((24, 40), (6, 10))]:
        seen = capture_mixer_calls(mixers)
        model(torch.randn(2, 3, *size))
        check_mixer_calls(seen[-3:], grid, 3)


def test_options_reach_the_mixers():
    model = tiny_vit(class_token=False, global_pool="avg").to(torch.float64)
    replace_attention(model, pattern="sweep2", mixer="bidirectional", prefix_position="middle")
    zigma = model.blocks[1].attn.mixer
    assert zigma.zigzag.pattern == "sweep2" and zigma.zigzag.prefix_position == "middle"
    assert type(zigma.mixer).__name__ == "BiMamba"
    assert zigma.mixer.in_proj.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_the_cross_mixer_converts_and_trains():
    model = tiny_vit(dynamic_img_size=True)
    replace_attention(model, pattern="sweep4", mixer="cross", d_state=4)
    randomise(model, seed=3, scale=0.02)
    mixers = [block.attn.mixer for block in model.blocks]
    assert all(type(m.mixer).__name__ == "CrossMamba" and m.mixer.k == 4 for m in mixers)
    out = model(torch.randn(2, 3, 32, 48))  # another grid than the default: 8 x 12
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(m.mixer.x_proj_weight.grad.abs().sum() > 0 for m in mixers)


class Causal(Attention):
    is_causal = True


class Rope(Attention):
    def forward(self, x, rope=None, attn_mask=None):
        return super().forward(x, attn_mask=attn_mask)


class Wider(Attention):
    def __init__(self, dim):
        super().__init__(dim, num_heads=2)
        self.proj = nn.Linear(dim, 2 * dim)


@pytest.mark.parametrize(
    ("attention", "error", "match"),
    [
        (Causal, ValueError, r"model: blocks\[1\].attn is a causal attention"),
        (Rope, TypeError, r"model: blocks\[1\].attn is called as Rope\(x, rope, attn_mask\)"),
        (Wider, TypeError, r"model: blocks\[1\].attn maps tokens of width 64 to another width"),
    ],
)
def test_a_block_with_an_attention_of_another_shape_is_refused(attention, error, match):
    model = tiny_vit()
    model.blocks[1] = Block(64, num_heads=2)
    model.blocks[1].attn = attention(64)
    with pytest.raises(error, match=match):
        replace_attention(model)
    assert isinstance(model.blocks[0].attn, Attention)  # nothing was replaced


def test_is_causal_is_refused_when_passed():
    model = replace_attention(tiny_vit())
    with pytest.raises(ValueError, match="cannot honour is_causal"):
        model.blocks[0].attn(torch.randn(1, 65, 64), is_causal=True)


def test_a_bad_mamba_argument_leaves_the_model_as_it_was():
    model = tiny_vit()
    with pytest.raises(ValueError, match="d_state must be a positive int"):
        replace_attention(model, d_state=0)
    assert all(isinstance(block.attn, Attention) for block in model.blocks)
    assert not model.patch_embed.proj._forward_hooks


def test_converting_twice_is_refused():
    model = replace_attention(tiny_vit())
    with pytest.raises(ValueError, match=r"model: blocks\[0\].attn is already a ZigMa mixer"):
        replace_attention(model)
