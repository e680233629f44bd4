"""replace_attention on Hugging Face transformers' vision models, under transformers' own
features: every model family it takes or refuses, gradient checkpointing over two image sizes,
threads, save_pretrained and its reload, output_attentions and attention implementations."""

import copy
import threading

import pytest
import torch
from helpers import capture_mixer_calls, check_mixer_calls, gradients, randomise

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from zigzag_mamba.integrations import ViTMixer, from_pretrained, replace_attention  # noqa: E402

SMALL = dict(
    image_size=8,
    patch_size=2,
    num_channels=1,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
)


def build(model: str = "ViTForImageClassification", config: str = "ViTConfig", **options):
    torch.manual_seed(0)
    settings = {**SMALL, "num_labels": 10, **options}
    return getattr(transformers, model)(getattr(transformers, config)(**settings))


def hf_layers(model):
    core = model.vit if hasattr(model, "vit") else model
    return core.layers if hasattr(core, "layers") else core.encoder.layer


def mixers_of(model) -> list[ViTMixer]:
    return [m for m in model.modules() if isinstance(m, ViTMixer)]


BEIT_ABSOLUTE = dict(use_absolute_position_embeddings=True)
# Each family: (model class, config class, options, input shape) and the outcome the tests
# measure, its prefix-token count or the refusal's words. docs/integrations.md shows this table.
FAMILIES = {
    "ViTModel": (("ViTModel", "ViTConfig", {}, (2, 1, 8, 8)), 1),
    "ViTForImageClassification": (("ViTForImageClassification", "ViTConfig", {}, None), 1),
    "DeiTForImageClassificationWithTeacher": (
        ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}, None),
        2,  # class and distillation tokens
    ),
    "BeitModel": (("BeitModel", "BeitConfig", BEIT_ABSOLUTE, None), 1),
    "Data2VecVisionModel": (("Data2VecVisionModel", "Data2VecVisionConfig", {}, None), 1),
    "Dinov2Model": (("Dinov2Model", "Dinov2Config", {}, None), 1),
    "Dinov2WithRegistersModel": (
        ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 3}, None),
        4,
    ),
    "ViTMSNModel": (("ViTMSNModel", "ViTMSNConfig", {}, None), 1),
    "IJepaModel": (("IJepaModel", "IJepaConfig", {}, None), 0),
    "DPTModel": (("DPTModel", "DPTConfig", {}, None), 1),  # its attention returns a tensor
    "TimesformerModel": (
        ("TimesformerModel", "TimesformerConfig", {"num_frames": 2}, (2, 2, 1, 8, 8)),
        1,  # each frame's spatial attention; the temporal attention stays
    ),
    "BeitModel (relative position bias)": (
        ("BeitModel", "BeitConfig", {"use_relative_position_bias": True}, None),
        "adds a relative position bias",
    ),
    "ViTMAEModel": (("ViTMAEModel", "ViTMAEConfig", {}, None), "random, shuffled subset"),
    "YolosModel": (
        ("YolosModel", "YolosConfig", {"num_detection_tokens": 3, "image_size": [8, 8]}, None),
        "appends detection tokens",
    ),
    "VideoMAEModel": (
        ("VideoMAEModel", "VideoMAEConfig", {"num_frames": 4, "tubelet_size": 2}, None),
        "is a Conv3d, not a patch Conv2d",
    ),
    "SwinModel": (
        ("SwinModel", "SwinConfig", {"embed_dim": 16, "depths": [1], "num_heads": [2]}, None),
        "found no attention of the expected shape in SwinModel",
    ),
    "DINOv3ViTModel": (
        ("DINOv3ViTModel", "DINOv3ViTConfig", {}, None),
        "found no attention of the expected shape in DINOv3ViTModel",  # rotary positions
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_converted_exactly_or_refused_with_its_reason(family):
    (model_name, config_name, options, shape), outcome = FAMILIES[family]
    settings = {**SMALL, **options}
    if model_name == "SwinModel":  # stages of windows: none of a ViT's sizes apply
        settings = {"image_size": 8, "patch_size": 2, "num_channels": 1, **options}
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**settings))
    if isinstance(outcome, str):
        with pytest.raises((TypeError, ValueError), match=outcome):
            replace_attention(model)
        assert not mixers_of(model)  # nothing was replaced
        return
    replace_attention(model, d_state=4)
    randomise(model, seed=1, scale=0.02)  # off zero-initialised class and position tokens
    mixers = mixers_of(model)
    assert len(mixers) == 3 and [m.mixer.layer_idx for m in mixers] == [0, 1, 2]
    seen = capture_mixer_calls(mixers)
    out = model(torch.randn(*(shape or (2, 1, 8, 8))))
    check_mixer_calls(seen, (4, 4), outcome)
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    first.float().square().mean().backward()
    assert all(m.mixer.mixer.in_proj.weight.grad.abs().sum() > 0 for m in mixers)


@pytest.mark.parametrize("model", ["ViTForImageClassification", "ViTModel"])
def test_options_reach_the_mixers_and_q_k_v_are_gone(model):
    vit = replace_attention(build(model), pattern="sweep2", mixer="bidirectional", d_state=8)
    mixers = [layer.attention for layer in hf_layers(vit)]
    assert all(isinstance(m, ViTMixer) and m.kind == "transformers" for m in mixers)
    zigma = mixers[1].mixer
    assert zigma.zigzag.pattern == "sweep2" and type(zigma.mixer).__name__ == "BiMamba"
    assert zigma.mixer.d_state == 8
    assert not any("q_proj" in name or "query" in name for name in vit.state_dict())


def test_non_square_and_interpolated_sizes():
    wide = replace_attention(build(image_size=[8, 12]))
    seen = capture_mixer_calls(mixers_of(wide))
    assert wide(torch.randn(2, 1, 8, 12)).logits.shape == (2, 10)
    check_mixer_calls(seen, (4, 6), 1)
    square = replace_attention(build())
    seen = capture_mixer_calls(mixers_of(square))
    out = square(torch.randn(2, 1, 12, 16), interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 10)
    check_mixer_calls(seen, (6, 8), 1)
    seen.clear()
    square(torch.randn(2, 1, 8, 8))  # back to the first size
    check_mixer_calls(seen, (4, 4), 1)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_over_two_image_sizes_gives_the_plain_gradients(use_reentrant):
    # Equal token counts, other grids: each recompute must read its own forward's grid.
    vit = replace_attention(build(hidden_dropout_prob=0.0)).train()
    images = [torch.randn(2, 1, 8, 12), torch.randn(2, 1, 12, 8)]
    forward = lambda x: vit(x, interpolate_pos_encoding=True).logits
    plain = gradients(vit, forward, images)
    # transformers 5 renamed gradient_checkpointing_enable activation_checkpointing_enable.
    switch_on = getattr(vit, "activation_checkpointing_enable", vit.gradient_checkpointing_enable)
    switch_on({"use_reentrant": use_reentrant})
    if use_reentrant:  # reentrant checkpointing needs an input that requires grad
        vit.enable_input_require_grads()
    checkpointed = gradients(vit, forward, images)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def test_two_threads_at_two_image_sizes():
    vit = replace_attention(build()).eval()
    images = [torch.randn(2, 1, 8, 12), torch.randn(2, 1, 12, 8)]
    forward = lambda x: vit(x, interpolate_pos_encoding=True).logits
    with torch.no_grad():
        alone = [forward(x) for x in images]
    results, barrier = [None, None], threading.Barrier(2)

    def run(k):
        barrier.wait()
        with torch.no_grad():
            results[k] = [forward(images[k]) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, r) for a, rs in zip(alone, results, strict=True) for r in rs)


def test_save_pretrained_then_from_pretrained_gives_the_same_outputs(tmp_path):
    vit = replace_attention(build(num_register_tokens=0), pattern="sweep2", d_state=8).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    vit.save_pretrained(tmp_path / "zigma-vit")
    again = from_pretrained(transformers.ViTForImageClassification, tmp_path / "zigma-vit")
    assert again.config.zigma == vit.config.zigma
    assert again.config.zigma["pattern"] == "sweep2" and again.config.zigma["d_state"] == 8
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x).logits, vit(x).logits)
    plain = build()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain.*records no ZigMa conversion"):
        from_pretrained(transformers.ViTForImageClassification, tmp_path / "plain")


def test_the_cross_mixer_converts_trains_and_reloads(tmp_path):
    vit = replace_attention(build(num_register_tokens=0), "zigzag8", mixer="cross", k=2, d_state=4)
    mixers = mixers_of(vit)
    assert mixers[0].mixer.zigzag.order.shape == (2, 17)  # S0 and S1 in layer 0
    randomise(vit, seed=2, scale=0.02)
    vit.eval()
    x = torch.randn(2, 1, 8, 8)
    vit(x).logits.square().mean().backward()
    assert all(m.mixer.mixer.x_proj_weight.grad.abs().sum() > 0 for m in mixers)
    vit.save_pretrained(tmp_path / "cross")
    again = from_pretrained(transformers.ViTForImageClassification, tmp_path / "cross")
    assert again.config.zigma["mixer"] == "cross" and again.config.zigma["k"] == 2
    with torch.no_grad():
        assert torch.equal(again(x).logits, vit(x).logits)


def test_weights_reload_into_a_converted_model():
    vit = replace_attention(build())
    fresh = replace_attention(build())
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh.load_state_dict(vit.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x).logits, vit(x).logits)


def test_attention_weights_and_implementations_are_refused():
    vit = replace_attention(build())
    with pytest.raises(ValueError, match=r"output_attentions: .* compute no attention weights"):
        vit(torch.randn(1, 1, 8, 8), output_attentions=True)
    with pytest.raises(ValueError, match=r"set_attn_implementation: .* no attention"):
        vit.set_attn_implementation("eager")


def test_masks_are_refused():
    vit = replace_attention(build())
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, 3] = False
    with pytest.raises(ValueError, match=r"attention_mask: .* cannot honour"):
        vit(torch.randn(2, 1, 8, 8), attention_mask=mask)
    attention = hf_layers(vit)[0].attention
    with pytest.raises(ValueError, match="cannot honour head_mask"):
        attention(torch.randn(2, 17, 32), head_mask=torch.ones(2))


def test_a_converted_model_copies_with_its_own_grid():
    vit = replace_attention(build())
    twin = copy.deepcopy(vit)
    twin(torch.randn(1, 1, 12, 8), interpolate_pos_encoding=True)
    assert hf_layers(twin)[0].attention.tracker.grid == (6, 4)
    assert hf_layers(vit)[0].attention.tracker.grid == (4, 4)
    assert hf_layers(twin)[2].attention.tracker is hf_layers(twin)[0].attention.tracker


def test_a_bad_mamba_argument_leaves_the_model_as_it_was():
    vit = build()
    with pytest.raises(ValueError, match="d_state must be a positive int"):
        replace_attention(vit, d_state=0)
    assert not mixers_of(vit)
    assert not vit.vit.embeddings.patch_embeddings.projection._forward_hooks


def test_converting_twice_is_refused():
    vit = replace_attention(build())
    with pytest.raises(ValueError, match=r"model: .*\[0\].attention is already a ZigMa mixer"):
        replace_attention(vit)
