"""replace_attention on timm's own VisionTransformer, where timm imports.

timm needs torchvision, which has no build that imports beside the CPU-only torch of CI; these
tests run wherever timm does (benchmarks/gpu_check.sh runs them on the GPU machine). The same
contract is tested everywhere on a model shaped like timm's (test_replace_attention.py).
"""

import inspect

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from zigzag_mamba.integrations import ViTMixer, replace_attention  # noqa: E402


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=3)
    return VisionTransformer(**{**options, "num_heads": 2, **kwargs})


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
def test_timm_vision_transformer(kwargs, prefix):
    model = replace_attention(tiny_vit(**kwargs), pattern="zigzag8")
    mixers = [block.attn for block in model.blocks]
    assert all(isinstance(m, ViTMixer) and m.kind == "timm" for m in mixers)
    assert [m.mixer.layer_idx for m in mixers] == [0, 1, 2]
    assert {m.mixer.zigzag.num_prefix_tokens for m in mixers} == {prefix}
    grids = mixer_grids(model)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and grids == [(8, 8)] * 3
    out.sum().backward()
    assert all(m.mixer.mixer.in_proj.weight.grad is not None for m in mixers)


def test_dynamic_and_non_square_image_sizes():
    model = replace_attention(tiny_vit(dynamic_img_size=True, reg_tokens=2))
    grids = mixer_grids(model)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 10)
    assert model(torch.randn(1, 3, 24, 16)).shape == (1, 10)
    assert grids == [(8, 12)] * 3 + [(6, 4)] * 3
    wide = replace_attention(tiny_vit(img_size=(16, 40)))
    assert wide(torch.randn(1, 3, 16, 40)).shape == (1, 10)


def test_intermediates_and_features():
    model = replace_attention(tiny_vit(reg_tokens=1))
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 2 + 64, 64)
    if hasattr(model, "forward_intermediates"):
        _, intermediates = model.forward_intermediates(torch.randn(2, 3, 32, 32))
        assert len(intermediates) == 3 and intermediates[0].shape == (2, 64, 8, 8)


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
