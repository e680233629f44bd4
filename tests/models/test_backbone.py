import json
import math

import numpy as np
import pytest
import torch
from helpers import randomise

from zigzag_mamba.models import CONFIGS, ZigMaBackbone
from zigzag_mamba.modules.embed import unpatchify

TINY = {"dim": 32, "depth": 2, "patch_size": 2}


def tiny(**kwargs):
    kwargs = {"input_size": 8, "in_channels": 4, **TINY, **kwargs}
    return ZigMaBackbone(**kwargs)


def expected_parameters(dim, depth, patch_size, in_channels, tokens, num_classes=0):
    """ZigMa's parameter count, written out from the architecture (learned PE, no text)."""
    inner, rank, state, conv = 2 * dim, math.ceil(dim / 16), 16, 4
    mixer = (
        dim * 2 * inner  # in_proj
        + inner * conv
        + inner  # depthwise conv
        + (rank + 2 * state) * inner  # x_proj
        + rank * inner
        + inner  # dt_proj
        + inner * state
        + inner  # A_log, D
        + inner * dim  # out_proj
    )
    block = mixer + dim + dim * 3 * dim + 3 * dim  # + RMSNorm + adaLN
    patch = patch_size * patch_size * in_channels
    embed = patch * dim + dim + 256 * dim + dim + dim * dim + dim + num_classes * dim
    return depth * block + tokens * dim + embed + dim + dim * patch + patch


# ---------------------------------------------------------------- shapes and conditioning


@pytest.mark.parametrize(
    "kwargs, x_shape, extra",
    [
        ({}, (2, 4, 8, 8), {}),
        ({"input_size": (8, 12), "pos_embed": "sincos"}, (2, 4, 8, 12), {}),
        ({"num_classes": 5}, (2, 4, 8, 8), {"y": torch.tensor([0, 5])}),
        ({"context_dim": 12}, (2, 4, 8, 8), {"context": torch.randn(2, 3, 12)}),
        ({"num_frames": 3, "pattern": "video_sst", "pos_embed": "sincos"}, (2, 3, 4, 8, 8), {}),
        ({"num_frames": 2, "pattern": "video_st", "input_size": (4, 8)}, (2, 2, 4, 4, 8), {}),
        ({"pattern": None, "mixer": "bidirectional", "pos_embed": "none"}, (2, 4, 8, 8), {}),
    ],
)
def test_output_shapes(kwargs, x_shape, extra):
    model = tiny(**kwargs)
    out = model(torch.randn(x_shape), torch.rand(2), **extra)
    assert out.shape == x_shape and torch.isfinite(out).all()


def test_unpatchify_inverts_patchify_layout():
    # With identity-like weights the output pixels are the input pixels: checks (p, q, C) order.
    # float64: the least-squares solve amplifies rounding by the weight's condition number,
    # which for some random inits pushed fp32 past the tolerance.
    model = tiny(input_size=(4, 6), patch_size=2, dim=16, depth=1, pos_embed="none").double()
    x = torch.randn(1, 4, 4, 6, dtype=torch.float64)
    tokens = model._patchify(x)  # each token: D features of a patch
    weight = model.x_embedder.proj.weight.flatten(1)  # (D, C*p*p), laid out (C, p, q)
    patches = torch.linalg.lstsq(weight, (tokens[0] - model.x_embedder.proj.bias).T).solution
    patches = patches.T.reshape(-1, 4, 2, 2).permute(0, 2, 3, 1).reshape(1, -1, 16)  # (p, q, C)
    pixels = unpatchify(patches, model.grid, model.patch_size)
    torch.testing.assert_close(pixels, x, rtol=1e-4, atol=1e-4)


def test_sincos_table_is_mae_layout_and_frozen():
    model = tiny(input_size=(4, 6), pos_embed="sincos", dim=16)
    table = model.pos_embed[0].numpy()
    h, w = 2, 3
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    for r in range(h):
        for c in range(w):
            expect = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
            )
            np.testing.assert_allclose(table[r * w + c], expect, rtol=1e-6, atol=1e-7)
    assert not model.pos_embed.requires_grad and "pos_embed" in model.state_dict()


def test_learned_tables_start_at_zero():
    assert torch.count_nonzero(tiny().pos_embed) == 0
    video = tiny(num_frames=2, pattern="video_st", pos_embed="sincos")
    assert (
        video.temporal_pos_embedding.shape == (1, 2, 32)
        and video.temporal_pos_embedding.requires_grad
    )
    assert "pos_embed" not in tiny(pos_embed="none").state_dict()


def test_timestep_embedding_is_cos_then_sin_of_1000_t():
    model = tiny()
    t = torch.rand(3)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    args = 1000 * t[:, None] * freqs
    features = torch.cat([args.cos(), args.sin()], dim=1)
    mlp = model.t_embedder.mlp
    torch.testing.assert_close(model._condition(t, None, None, 3)[0], mlp(features))


def test_text_condition_is_t_plus_mean_of_projected_tokens():
    model = tiny(context_dim=12)
    t, context = torch.rand(2), torch.randn(2, 5, 12)
    c, tokens = model._condition(t, None, context, 2)
    t_emb = model.t_embedder(1000 * t)
    torch.testing.assert_close(tokens, model.y_embedder(context))
    torch.testing.assert_close(c, t_emb + tokens.mean(1))


def test_label_dropout_only_in_training():
    model = tiny(num_classes=5, class_dropout_prob=0.99)
    labels = torch.zeros(64, dtype=torch.long)
    table = model.y_embedder.embedding_table.weight
    model.train()
    dropped = model.y_embedder(labels)
    assert (dropped == table[5]).all(-1).sum() > 40
    model.eval()
    assert torch.equal(model.y_embedder(labels), table[labels])


def test_null_row_only_with_label_dropout():
    assert tiny(num_classes=5).y_embedder.embedding_table.num_embeddings == 6
    assert (
        tiny(num_classes=5, class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5
    )


def test_initialisation_follows_zigma():
    model = tiny(depth=3)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        bound = 1 / math.sqrt(block.mixer.d_inner) / math.sqrt(3)
        assert block.mixer.out_proj.weight.abs().max() <= bound
        assert torch.count_nonzero(block.mixer.dt_proj.bias) == block.mixer.d_inner
    assert torch.count_nonzero(model.t_embedder.mlp[0].bias) == 0
    assert torch.count_nonzero(model.final_layer.linear.bias) == 0
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0
    assert model.t_embedder.mlp[2].weight.std() < 0.03


# ---------------------------------------------------------------- guidance, checkpointing, dtype


def test_cfg_with_scale_one_equals_the_conditional_model():
    torch.manual_seed(0)
    model = tiny(num_classes=5).eval()
    randomise(model, 1, scale=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])
    null = torch.full((2,), 5)
    batch = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.0)
    cond = model(x, t, y)
    torch.testing.assert_close(batch[:2], cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch[2:], cond, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels", ["all", 3])
def test_cfg_guides_the_chosen_channels(channels):
    torch.manual_seed(0)
    model = tiny(num_classes=5).eval()
    randomise(model, 2, scale=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])
    null = torch.full((2,), 5)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    out = model.forward_with_cfg(xx, tt, yy, 4.0, channels=channels)
    cond, uncond = model(x, t, y), model(x, t, null)
    guided = uncond + 4.0 * (cond - uncond)
    k = 4 if channels == "all" else 3
    torch.testing.assert_close(out[:2, :k], guided[:, :k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:2, k:], cond[:, k:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2:, k:], uncond[:, k:], rtol=1e-4, atol=1e-5)


def test_cfg_for_text_and_video():
    model = tiny(context_dim=6, num_frames=2, pattern="video_st").eval()
    x, context = torch.randn(2, 2, 4, 8, 8), torch.randn(2, 3, 6)
    out = model.forward_with_cfg(x, torch.rand(2), None, 2.0, context=context)
    assert out.shape == x.shape and torch.equal(out[0], out[1])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(num_classes=5, class_dropout_prob=0.0)
    randomise(model, 3, scale=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4])

    def grads():
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_bf16_autocast_on_cpu():
    model = tiny(num_classes=5)
    randomise(model, 4, scale=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = model(x, t, y)
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_compiles_without_graph_breaks():
    model = tiny(num_classes=5).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4])
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- errors


def test_input_errors():
    model = tiny(num_classes=5)
    t = torch.rand(2)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 10), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 4\] or 5"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"class labels must be in"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="pass labels"):
        model(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(torch.randn(2, 4, 8, 8), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text-conditional"):
        tiny(context_dim=4)(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match="channels"):
        tiny().forward_with_cfg(torch.randn(2, 4, 8, 8), t, None, 2.0, channels=5)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="rope")
    with pytest.raises(ValueError, match="not both"):
        tiny(num_classes=3, context_dim=4)
    with pytest.raises(ValueError, match="for video use"):
        tiny(num_frames=2, pattern="zigzag8")


# ---------------------------------------------------------------- meta device and sizes


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_meta_build_matches_a_normal_build(pos_embed):
    kwargs = {"num_classes": 5, "pos_embed": pos_embed}
    ref = tiny(**kwargs).eval()
    randomise(ref, 5, scale=0.05)
    meta = tiny(**kwargs, device="meta").eval()
    meta.to_empty(device="cpu")
    meta.init_non_persistent_buffers()
    if pos_embed == "sincos":
        assert torch.equal(meta.pos_embed, tiny(**kwargs).pos_embed)
    meta.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4])
    assert torch.equal(meta(x, t, y), ref(x, t, y))


def test_meta_build_then_initialize_weights_is_a_fresh_model():
    model = tiny(device="meta")
    model.to_empty(device="cpu")
    model.initialize_weights()
    normal = tiny()
    for (name, p), q in zip(model.named_parameters(), normal.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        assert p.shape == q.shape
    assert torch.equal(model.blocks[0].mixer.D, normal.blocks[0].mixer.D)
    assert model(torch.randn(1, 4, 8, 8), torch.rand(1)).shape == (1, 4, 8, 8)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_zigma_b1_parameter_count():
    # The official zigzag8_b1_pe2 config (32x32x4 latent, learned PE) has no class table.
    model = ZigMaBackbone(input_size=32, in_channels=4, device="meta", **CONFIGS["ZigMa-B/1"])
    assert round(count(model) / 1e6, 1) == 134.6
    # 1000 classes add a 1000 x 768 table (plus a null row with label dropout).
    for dropout, rows in [(0.0, 1000), (0.1, 1001)]:
        classes = ZigMaBackbone(
            input_size=32,
            in_channels=4,
            num_classes=1000,
            class_dropout_prob=dropout,
            device="meta",
            **CONFIGS["ZigMa-B/1"],
        )
        assert count(classes) - count(model) == rows * 768
        assert round(count(classes) / 1e6, 1) == 135.4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_preset_builds_on_meta(name):
    config = CONFIGS[name]
    model = ZigMaBackbone(input_size=32, in_channels=4, device="meta", **config)
    tokens = (32 // config["patch_size"]) ** 2
    expected = expected_parameters(config["dim"], config["depth"], config["patch_size"], 4, tokens)
    assert count(model) == expected


# ---------------------------------------------------------------- save_pretrained / from_pretrained


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 10, "input_size": (8, 12), "pos_embed": "sincos"},
        {"context_dim": 16, "pattern": "hilbert4", "ssm_cfg": {"d_state": 8}},
        {"num_frames": 2, "pattern": "video_st", "input_size": 4},
    ],
)
def test_save_pretrained_round_trip_gives_the_same_model(tmp_path, kwargs):
    model = tiny(**kwargs).eval()
    randomise(model, seed=3, scale=0.05)
    model.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = ZigMaBackbone.from_pretrained(tmp_path / "run").eval()
    assert loaded.config == model.config
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    frames = (kwargs["num_frames"],) if "num_frames" in kwargs else ()
    x = torch.randn(2, *frames, 4, *model.image_size)
    t = torch.rand(2)
    extra = {"y": torch.tensor([1, 7])} if "num_classes" in kwargs else {}
    if "context_dim" in kwargs:
        extra = {"context": torch.randn(2, 3, 16)}
    assert torch.equal(loaded(x, t, **extra), model(x, t, **extra))


def test_from_pretrained_overrides_and_casts(tmp_path):
    tiny(num_classes=10).save_pretrained(tmp_path)
    loaded = ZigMaBackbone.from_pretrained(tmp_path, dtype=torch.bfloat16, pattern="sweep2")
    assert loaded.config.pattern == "sweep2"
    assert loaded.blocks[1].zigzag.pattern_name == "sweep2"
    assert loaded.x_embedder.proj.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].mixer.A_log.dtype == torch.float32  # kept in fp32, as when built


def test_from_pretrained_is_strict(tmp_path):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(RuntimeError, match="Missing key"):
        ZigMaBackbone.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors missing"):
        ZigMaBackbone.from_pretrained(tmp_path / "elsewhere")


def test_save_pretrained_needs_a_named_scan(tmp_path):
    model = tiny(pattern=torch.arange(16).flip(0))
    with pytest.raises(ValueError, match="register_pattern"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- failure modes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "depth must be a positive int"),
        ({"depth": -1}, "depth must be a positive int"),
        ({"dim": 0}, "dim must be a positive int"),
        ({"patch_size": 0}, "patch_size must be a positive int"),
        ({"patch_size": -2}, "patch_size must be a positive int"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"num_frames": -1}, "num_frames must be an int >= 0"),
        ({"num_classes": 2.5}, "num_classes must be an int >= 0"),
        ({"context_dim": 0}, "context_dim must be a positive int"),
        ({"class_dropout_prob": 1.0}, r"class_dropout_prob must be in \[0, 1\)"),
        ({"norm_eps": 0}, "norm_eps must be a positive number"),
        ({"input_size": 8.0}, "input_size must be H or"),
        ({"ssm_cfg": {"d_state": 0}}, "d_state must be a positive int"),
    ],
)
def test_config_values_are_checked_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_labels_must_match_the_batch():
    model = tiny(num_classes=5)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with pytest.raises(
        ValueError, match=r"labels y must have shape \(2,\) for x's batch, got \(3,\)"
    ):
        model(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels y must have shape \(2,\)"):
        model(x, t, torch.tensor([[0, 1]]))


@pytest.mark.parametrize("kwargs", [{"num_classes": 5}, {"context_dim": 6}, {}])
def test_an_empty_batch_runs_forward_and_backward(kwargs):
    model = tiny(**kwargs)
    randomise(model, 2, scale=0.05)
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    extra = {"y": torch.zeros(0, dtype=torch.long)} if "num_classes" in kwargs else {}
    if "context_dim" in kwargs:
        extra = {"context": torch.randn(0, 3, 6)}
    out = model(x, torch.rand(0), **extra)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_to_empty_refills_the_orders():
    # to_empty() leaves uninitialised memory; the orders are refilled by the move itself.
    reference = tiny()
    model = tiny(device="meta").to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert torch.equal(model(x, t), reference(x, t))


def test_presets_are_read_only_and_can_be_copied():
    with pytest.raises(TypeError):
        CONFIGS["ZigMa-T/2"]["depth"] = 1
    with pytest.raises(TypeError):
        CONFIGS["ZigMa-T/3"] = {"dim": 8}
    changed = {**CONFIGS["ZigMa-T/2"], "depth": 1}
    assert changed["depth"] == 1 and CONFIGS["ZigMa-T/2"]["depth"] == 4
    assert tiny(**{**CONFIGS["ZigMa-T/2"], "depth": 1}).depth == 1
