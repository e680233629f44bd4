"""Official ZigMa checkpoints: key layout, strict loading, and outputs against the official math."""

import math

import pytest
import torch
import torch.nn.functional as F

from zigzag_mamba.models import ZigMaBackbone, convert_official_state_dict, official_config
from zigzag_mamba.ops.selective_scan import selective_scan_reference

# The official zigzag orders S0..S7 of a 4 x 4 grid (docs/design.md, "Token orders").
S = [
    [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
    [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3],
    [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8, 12, 13, 14, 15],
    [3, 7, 11, 15, 14, 10, 6, 2, 1, 5, 9, 13, 12, 8, 4, 0],
]


def official_state_dict(dim, depth, patch, channels, tokens, classes=0, d_context=0, seed=0):
    """Random tensors under the official key names and shapes (docs/design.md, "The block and
    the backbone")."""
    g = torch.Generator().manual_seed(seed)
    inner, rank, state = 2 * dim, math.ceil(dim / 16), 16
    shapes = {
        "pos_embed": (1, tokens, dim),
        "x_embedder.proj.weight": (dim, channels, patch, patch),
        "x_embedder.proj.bias": (dim,),
        "t_embedder.mlp.0.weight": (dim, 256),
        "t_embedder.mlp.0.bias": (dim,),
        "t_embedder.mlp.2.weight": (dim, dim),
        "t_embedder.mlp.2.bias": (dim,),
        "norm_f.weight": (dim,),
        "final_layer.linear.weight": (patch * patch * channels, dim),
        "final_layer.linear.bias": (patch * patch * channels,),
    }
    if classes:
        shapes["y_embedder.embedding_table.weight"] = (classes, dim)
    if d_context:
        shapes["y_embedder.weight"] = (dim, d_context)
        shapes["y_embedder.bias"] = (dim,)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "mixer.A_log": (inner, state),
            b + "mixer.D": (inner,),
            b + "mixer.in_proj.weight": (2 * inner, dim),
            b + "mixer.conv1d.weight": (inner, 1, 4),
            b + "mixer.conv1d.bias": (inner,),
            b + "mixer.x_proj.weight": (rank + 2 * state, inner),
            b + "mixer.dt_proj.weight": (inner, rank),
            b + "mixer.dt_proj.bias": (inner,),
            b + "mixer.out_proj.weight": (dim, inner),
            b + "norm.weight": (dim,),
            b + "adaLN_modulation.1.weight": ((6 if d_context else 3) * dim, dim),
            b + "adaLN_modulation.1.bias": ((6 if d_context else 3) * dim,),
        }
        if d_context:
            shapes |= {
                b + "msa.to_q.weight": (512, dim),
                b + "msa.to_k.weight": (512, dim),
                b + "msa.to_v.weight": (512, dim),
                b + "msa.to_out.0.weight": (dim, 512),
                b + "msa.to_out.0.bias": (dim,),
            }
    sd = {k: 0.3 * torch.randn(s, generator=g) / math.sqrt(s[-1]) for k, s in shapes.items()}
    for k in sd:
        if k.endswith(("norm.weight", "norm_f.weight", "mixer.D")):
            sd[k] = 1 + sd[k]
        if k.endswith("A_log"):
            sd[k] = torch.arange(1.0, 17.0).log().expand(inner, 16) + sd[k]
    return sd


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def official_mixer(sd, b, x):
    """mamba_ssm's unfused Mamba path: (B, L, D) in scan order -> (B, L, D)."""
    L, inner = x.shape[1], sd[b + "D"].shape[0]
    rank = sd[b + "dt_proj.weight"].shape[1]
    xz = (x @ sd[b + "in_proj.weight"].T).transpose(1, 2)
    u, z = xz[:, :inner], xz[:, inner:]
    u = F.conv1d(u, sd[b + "conv1d.weight"], sd[b + "conv1d.bias"], padding=3, groups=inner)
    u = F.silu(u[..., :L])
    dt, Bm, Cm = (u.transpose(1, 2) @ sd[b + "x_proj.weight"].T).split([rank, 16, 16], -1)
    y = selective_scan_reference(
        u,
        (dt @ sd[b + "dt_proj.weight"].T).transpose(1, 2),
        -torch.exp(sd[b + "A_log"]),
        Bm.transpose(1, 2),
        Cm.transpose(1, 2),
        sd[b + "D"],
        z=z,
        delta_bias=sd[b + "dt_proj.bias"],
        delta_softplus=True,
    )
    return y.transpose(1, 2) @ sd[b + "out_proj.weight"].T


def official_forward(sd, x, t, y=None, context=None, depth=2):
    """model_zigma.ZigMa.forward (patch 1, 4 x 4 grid, zigzagN8) written out from its math."""
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"])
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    args = (t * 1000)[:, None] * freqs
    t_feat = torch.cat([args.cos(), args.sin()], -1)
    c = F.linear(
        F.silu(F.linear(t_feat, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
        sd["t_embedder.mlp.2.weight"],
        sd["t_embedder.mlp.2.bias"],
    )
    if y is not None:
        c = c + sd["y_embedder.embedding_table.weight"][y]
    if context is not None:
        context = F.linear(context, sd["y_embedder.weight"], sd["y_embedder.bias"])
        c = c + context.mean(1)
    residual = None
    for i in range(depth):
        b = f"blocks.{i}."
        residual = h if residual is None else residual + h
        n = rms(residual, sd[b + "norm.weight"])
        mod = F.linear(
            F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]
        )
        mod = mod[:, None].chunk(6 if context is not None else 3, -1)
        order = torch.tensor(S[i % 8])
        mixed = official_mixer(sd, b + "mixer.", (n * (1 + mod[1]) + mod[0])[:, order])
        h = n + mod[2] * mixed[:, torch.argsort(order)]
        if context is not None:
            q_in = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + mod[4]) + mod[3]
            heads = lambda v: v.unflatten(-1, (8, 64)).transpose(1, 2)
            q = heads(q_in @ sd[b + "msa.to_q.weight"].T)
            k = heads(context @ sd[b + "msa.to_k.weight"].T)
            v = heads(context @ sd[b + "msa.to_v.weight"].T)
            att = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
            att = F.linear(
                att.transpose(1, 2).flatten(2),
                sd[b + "msa.to_out.0.weight"],
                sd[b + "msa.to_out.0.bias"],
            )
            h = h + mod[5] * att
    h = rms(residual + h, sd["norm_f.weight"])
    h = F.layer_norm(h, h.shape[-1:], eps=1e-6)
    out = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    n_img, c_out = x.shape[0], x.shape[1]
    out = out.reshape(n_img, 4, 4, 1, 1, c_out)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n_img, c_out, 4, 4)


OFFICIAL_PARAMS = {
    "img_dim": 4,
    "in_channels": 4,
    "patch_size": 1,
    "embed_dim": 32,
    "depth": 2,
    "scan_type": "zigzagN8",
    "use_pe": 2,
}


def test_class_checkpoint_loads_strictly_and_matches_the_official_forward():
    sd = official_state_dict(32, 2, 1, 4, 16, classes=10)
    wrapped = {"module." + k: v for k, v in sd.items()}
    model = ZigMaBackbone.from_official(
        wrapped, **official_config(**OFFICIAL_PARAMS, num_classes=10)
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([3, 9])
    torch.testing.assert_close(
        model.eval()(x, t, y), official_forward(sd, x, t, y), rtol=1e-4, atol=1e-5
    )


def test_text_checkpoint_loads_strictly_and_matches_the_official_forward():
    sd = official_state_dict(32, 2, 1, 4, 16, d_context=24, seed=1)
    config = official_config(**OFFICIAL_PARAMS, has_text=True, d_context=24)
    model = ZigMaBackbone.from_official(sd, **config)
    x, t, context = torch.randn(2, 4, 4, 4), torch.rand(2), torch.randn(2, 5, 24)
    torch.testing.assert_close(
        model(x, t, context=context),
        official_forward(sd, x, t, context=context),
        rtol=1e-4,
        atol=1e-5,
    )


def test_bidirectional_v2_checkpoint_loads_strictly():
    sd = official_state_dict(32, 2, 1, 4, 16, seed=2)
    for i in range(2):
        b = f"blocks.{i}.mixer."
        sd |= {
            b + k.replace(".", "_b.", 1) if "." in k else b + k: v.clone()
            for k, v in [
                ("conv1d.weight", sd[b + "conv1d.weight"]),
                ("conv1d.bias", sd[b + "conv1d.bias"]),
                ("x_proj.weight", sd[b + "x_proj.weight"]),
                ("dt_proj.weight", sd[b + "dt_proj.weight"]),
                ("dt_proj.bias", sd[b + "dt_proj.bias"]),
            ]
        }
        sd[b + "A_b_log"], sd[b + "D_b"] = sd[b + "A_log"].clone(), sd[b + "D"].clone()
    del sd["pos_embed"]
    config = official_config(**{**OFFICIAL_PARAMS, "scan_type": "v2", "use_pe": 0})
    model = ZigMaBackbone.from_official(sd, **config)
    assert model.blocks[0].zigzag is None and model.pos_embed is None


def test_official_b1_config_has_134_6_m_parameters():
    config = official_config(
        img_dim=32,
        in_channels=4,
        patch_size=1,
        embed_dim=768,
        depth=24,
        scan_type="zigzagN8",
        use_pe=2,
    )
    model = ZigMaBackbone(**config, device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.6


@pytest.mark.parametrize(
    "official, ours",
    [
        ({"scan_type": "zigzagN4", "use_pe": 1}, {"pattern": "zigzag4", "pos_embed": "sincos"}),
        ({"scan_type": "v1", "use_pe": 3}, {"pattern": None, "pos_embed": "none"}),
        ({"scan_type": "v2"}, {"pattern": None, "mixer": "bidirectional"}),
        ({"scan_type": "video_sst", "video_frames": 4}, {"pattern": "video_sst", "num_frames": 4}),
        ({"scan_type": "zzvideo_st", "video_frames": 2}, {"pattern": "video_st", "num_frames": 2}),
        ({"num_classes": 101}, {"num_classes": 101, "class_dropout_prob": 0.0}),
    ],
)
def test_official_config_mapping(official, ours):
    config = official_config(**{**OFFICIAL_PARAMS, **official, "use_jit": True})
    for key, value in ours.items():
        assert config[key] == value


@pytest.mark.parametrize("scan_type", ["hilbertN8", "randomN8", "zigzagN3", "parallelN8", "v3"])
def test_unsupported_official_scans_are_refused(scan_type):
    with pytest.raises(ValueError, match="scan_type"):
        official_config(**{**OFFICIAL_PARAMS, "scan_type": scan_type})


def test_conversion_only_strips_wrapper_prefixes():
    sd = {"module._orig_mod.norm_f.weight": torch.ones(3), "blocks.0.norm.weight": torch.ones(3)}
    assert list(convert_official_state_dict(sd)) == ["norm_f.weight", "blocks.0.norm.weight"]
    with pytest.raises(ValueError, match="parallelN"):
        convert_official_state_dict({"blocks.0.mixer.A_b_log_list.0": torch.ones(1)})
    with pytest.raises(ValueError, match="training checkpoint"):
        convert_official_state_dict({"model": {}, "ema": {}})


def test_a_misspelt_official_key_is_named_not_ignored():
    # scan_typ= used to be swallowed, silently giving the default v2 (no-scan) model.
    with pytest.raises(TypeError, match=r"unknown official arguments \['scan_typ'\]"):
        official_config(**{**OFFICIAL_PARAMS, "scan_typ": "zigzagN8"})


def test_the_official_training_only_keys_are_accepted():
    training = {
        "drop_path_rate": 0.1,
        "n_context_token": 0,
        "fused_add_norm": True,
        "residual_in_fp32": True,
        "initializer_cfg": None,
        "device": "cuda",
        "use_jit": True,
        "m_init": True,
        "use_checkpoint": False,
        "dtype": torch.float32,
    }
    assert official_config(**OFFICIAL_PARAMS, **training) == official_config(**OFFICIAL_PARAMS)
