"""replace_attention on transformers ViTs and on models shaped like timm's VisionTransformer."""

import copy

import pytest
import torch
from timm_like import Attention, Block, TimmLikeViT
from torch import nn

from zigzag_mamba.integrations import GridTracker, ViTMixer, replace_attention
from zigzag_mamba.modules import ZigMaMixer
from zigzag_mamba.orders import layer_orders


def hf_vit(image_size=8, patch_size=2, layers=3, model="ViTForImageClassification"):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(0)
    return getattr(transformers, model)(config)


def hf_layers(model):
    core = model.vit if hasattr(model, "vit") else model
    return core.layers if hasattr(core, "layers") else core.encoder.layer


def capture(mixers):
    """Record (input, output) of every ViTMixer's ZigMa mixer call."""
    seen = []
    for mixer in mixers:
        mixer.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    return seen


def check_mixer_calls(seen, grid, prefix):
    for vit_mixer, x, out in seen:
        out = out[0] if isinstance(out, tuple) else out
        assert x.shape[1] == prefix + grid[0] * grid[1]
        zigma = vit_mixer.mixer
        assert torch.equal(out, zigma(x, grid=grid))
        order = layer_orders("zigzag8", grid, zigma.layer_idx + 1)[zigma.layer_idx]
        ssm_cfg = {"d_state": zigma.mixer.d_state}
        stand_alone = ZigMaMixer(32, grid, order, num_prefix_tokens=prefix, ssm_cfg=ssm_cfg)
        stand_alone.mixer.load_state_dict(zigma.mixer.state_dict())
        torch.testing.assert_close(out, stand_alone(x), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["ViTForImageClassification", "ViTModel"])
def test_transformers_vit(model):
    vit = replace_attention(hf_vit(model=model), pattern="zigzag8", d_state=8)
    layers = hf_layers(vit)
    mixers = [layer.attention for layer in layers]
    assert all(isinstance(m, ViTMixer) and m.kind == "transformers" for m in mixers)
    assert [m.mixer.layer_idx for m in mixers] == [0, 1, 2]
    assert all(m.mixer.zigzag.num_prefix_tokens == 1 for m in mixers)
    assert mixers[0].mixer.mixer.d_state == 8
    assert not any("q_proj" in name or "query" in name for name in vit.state_dict())
    seen = capture(mixers)
    out = vit(torch.randn(2, 1, 8, 8))
    assert len(seen) == 3
    check_mixer_calls(seen, (4, 4), 1)
    loss = out.logits.sum() if hasattr(out, "logits") else out.last_hidden_state.sum()
    loss.backward()
    assert all(m.mixer.mixer.in_proj.weight.grad.abs().sum() > 0 for m in mixers)


def test_transformers_non_square_and_interpolated_sizes():
    wide = replace_attention(hf_vit(image_size=[8, 12]))
    seen = capture(layer.attention for layer in hf_layers(wide))
    assert wide(torch.randn(2, 1, 8, 12)).logits.shape == (2, 10)
    check_mixer_calls(seen, (4, 6), 1)
    square = replace_attention(hf_vit(image_size=8))
    seen = capture(layer.attention for layer in hf_layers(square))
    out = square(torch.randn(2, 1, 12, 16), interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 10)
    check_mixer_calls(seen, (6, 8), 1)
    assert square(torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)  # back to the first size


def test_transformers_weights_reload_into_a_converted_model():
    vit = replace_attention(hf_vit())
    fresh = replace_attention(hf_vit())
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh.load_state_dict(vit.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x).logits, vit(x).logits)


def test_transformers_attention_masks_are_refused():
    vit = replace_attention(hf_vit())
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, 3] = False
    with pytest.raises(ValueError, match=r"attention_mask: .* cannot honour"):
        vit(torch.randn(2, 1, 8, 8), attention_mask=mask)
    attention = hf_layers(vit)[0].attention
    with pytest.raises(ValueError, match="cannot honour head_mask"):
        attention(torch.randn(2, 17, 32), head_mask=torch.ones(2))


def test_a_converted_model_copies_with_its_own_grid():
    vit = replace_attention(hf_vit())
    twin = copy.deepcopy(vit)
    twin(torch.randn(1, 1, 12, 8), interpolate_pos_encoding=True)
    assert hf_layers(twin)[0].attention.tracker.grid == (6, 4)
    assert hf_layers(vit)[0].attention.tracker.grid == (4, 4)
    assert hf_layers(twin)[2].attention.tracker is hf_layers(twin)[0].attention.tracker


# --------------------------------------------------------------------------- timm's shape


def test_a_timm_shaped_model():
    torch.manual_seed(0)
    vit = replace_attention(TimmLikeViT(reg_tokens=2, depth=3), pattern="zigzag8")
    mixers = [block.attn for block in vit.blocks]
    assert all(isinstance(m, ViTMixer) and m.kind == "timm" for m in mixers)
    assert [m.mixer.layer_idx for m in mixers] == [0, 1, 2]
    assert all(m.mixer.zigzag.num_prefix_tokens == 3 for m in mixers)
    for size, grid in [((8, 8), (4, 4)), ((8, 12), (4, 6)), ((6, 10), (3, 5))]:
        seen = capture(mixers)
        out = vit(torch.randn(2, 1, *size))
        assert out.shape == (2, 10)
        check_mixer_calls(seen[-3:], grid, 3)
    out.sum().backward()
    assert all(m.mixer.mixer.in_proj.weight.grad is not None for m in mixers)


def test_timm_shaped_options_reach_the_mixers():
    vit = TimmLikeViT(reg_tokens=0).to(torch.float64)
    replace_attention(vit, pattern="sweep2", mixer="bidirectional", prefix_position="middle")
    zigma = vit.blocks[1].attn.mixer
    assert zigma.zigzag.pattern == "sweep2" and zigma.zigzag.prefix_position == "middle"
    assert type(zigma.mixer).__name__ == "BiMamba"
    assert zigma.mixer.in_proj.weight.dtype == torch.float64
    assert vit(torch.randn(1, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_timm_shaped_masks_are_refused():
    vit = replace_attention(TimmLikeViT(attn_mask=torch.ones(19, 19, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"attn_mask: .* cannot honour attn_mask"):
        vit(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="cannot honour is_causal"):
        vit.blocks[0](torch.randn(1, 19, 32), is_causal=True)


class Causal(Attention):
    is_causal = True


class Rope(Attention):
    def forward(self, x, rope=None, attn_mask=None):
        return super().forward(x, attn_mask)


class Wider(Attention):
    def __init__(self, dim):
        super().__init__(dim)
        self.proj = nn.Linear(dim, 2 * dim)


@pytest.mark.parametrize(
    ("attention", "error", "match"),
    [
        (Causal, ValueError, r"model: blocks\[1\].attn is a causal attention"),
        (Rope, TypeError, r"model: blocks\[1\].attn is called as Rope\(x, rope, attn_mask\)"),
        (Wider, TypeError, r"model: blocks\[1\].attn maps tokens of width 32 to another width"),
    ],
)
def test_attentions_of_another_shape_are_refused(attention, error, match):
    vit = TimmLikeViT()
    vit.blocks[1] = Block(32, attention(32))
    with pytest.raises(error, match=match):
        replace_attention(vit)
    assert isinstance(vit.blocks[0].attn, Attention)  # nothing was replaced


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


def test_a_bad_mamba_argument_leaves_the_model_as_it_was():
    vit = TimmLikeViT()
    with pytest.raises(ValueError, match="d_state must be a positive int"):
        replace_attention(vit, d_state=0)
    assert all(isinstance(block.attn, Attention) for block in vit.blocks)
    assert not vit.patch_embed.proj._forward_hooks


def test_converting_twice_is_refused():
    vit = replace_attention(TimmLikeViT())
    with pytest.raises(ValueError, match=r"model: blocks\[0\].attn is already a ZigMa mixer"):
        replace_attention(vit)


def test_the_grid_tracker_reads_the_patch_convolution():
    tracker = GridTracker((2, 2))
    conv = nn.Conv2d(1, 4, 2, stride=2)
    conv.register_forward_hook(tracker)
    conv(torch.randn(1, 1, 6, 10))
    assert tracker.grid == (3, 5)
