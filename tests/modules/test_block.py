import pytest
import torch
import torch.nn.functional as F
from helpers import randomise

from zigzag_mamba import use_backend
from zigzag_mamba.modules import CrossAttention, ZigMaBlock
from zigzag_mamba.orders import layer_orders

DIM = 32


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def block_by_hand(block, order, x, c=None, context=None):
    """The official block, written out with plain indexing: returns (h, residual)."""
    n = rms_norm(x, block.norm.weight)
    if c is None:
        shift = scale = shift2 = scale2 = torch.zeros_like(x[:, :1])
        gate = gate2 = torch.ones_like(x[:, :1])
    else:
        chunks = (
            block.adaLN_modulation[1](F.silu(c))
            .unsqueeze(1)
            .chunk(6 if context is not None else 3, -1)
        )
        shift, scale, gate = chunks[:3]
        if context is not None:
            shift2, scale2, gate2 = chunks[3:]
    m = n * (1 + scale) + shift
    y = block.mixer(m[:, order])
    inverse = torch.argsort(order)
    h = n + gate * y[:, inverse]
    if context is not None:
        ln = F.layer_norm(h, (DIM,), eps=1e-6)
        h = h + gate2 * block.msa(ln * (1 + scale2) + shift2, context)
    return h, x


@pytest.fixture
def x():
    return torch.randn(2, 24, DIM)


def test_zero_init_gates_leave_only_the_normalised_stream(x):
    block = ZigMaBlock(DIM, (4, 6), "zigzag8", layer_idx=2)
    h_prev, residual_prev, c = torch.randn_like(x), x, torch.randn(2, DIM)
    h, residual = block.forward_residual(h_prev, residual_prev, c)
    # The residual path passes through exactly; h is exactly the normalised stream.
    assert torch.equal(residual, residual_prev + h_prev)
    assert torch.equal(h, block.norm(residual))
    h.square().sum().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in block.mixer.parameters())
    assert block.adaLN_modulation[1].weight.grad.abs().sum() > 0
    torch.testing.assert_close(block(x, c), x + rms_norm(x, block.norm.weight), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid, pattern", [((4, 6), "zigzag8"), ((4, 6), "sweep4")])
@pytest.mark.parametrize("layer_idx", [0, 5])
@pytest.mark.parametrize("conditioned", [False, True])
def test_block_equals_the_official_composition(x, grid, pattern, layer_idx, conditioned):
    block = ZigMaBlock(DIM, grid, pattern, layer_idx)
    randomise(block, layer_idx)
    c = torch.randn(2, DIM) if conditioned else None
    order = layer_orders(pattern, grid, layer_idx + 1)[layer_idx]
    h_ref, residual_ref = block_by_hand(block, order, x, c)
    h, residual = block.forward_residual(x, None, c)
    torch.testing.assert_close(h, h_ref)
    assert torch.equal(residual, residual_ref)
    torch.testing.assert_close(block(x, c), x + h_ref)


def test_text_block_equals_the_official_composition(x):
    block = ZigMaBlock(DIM, (4, 6), "zigzag4", 1, context_dim=DIM)
    assert block.adaLN_modulation[1].out_features == 6 * DIM
    randomise(block, 3)
    c, context = torch.randn(2, DIM), torch.randn(2, 5, DIM)
    order = layer_orders("zigzag4", (4, 6), 2)[1]
    h_ref, _ = block_by_hand(block, order, x, c, context)
    h, _ = block.forward_residual(x, None, c, context)
    torch.testing.assert_close(h, h_ref)


def test_residual_is_kept_in_fp32_and_accumulates(x):
    block = ZigMaBlock(DIM, (4, 6))
    h = x.bfloat16()
    residual = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_out, r_out = block.forward_residual(h, residual)
    assert r_out.dtype == torch.float32 and h_out.dtype == torch.bfloat16
    assert torch.equal(r_out, residual + h.float())


def test_cross_attention_equals_softmax_attention():
    attn = CrossAttention(DIM, context_dim=16, heads=2, dim_head=8)
    q_in, ctx = torch.randn(2, 5, DIM), torch.randn(2, 7, 16)
    q = attn.to_q(q_in).view(2, 5, 2, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(2, 7, 2, 8).transpose(1, 2)
    v = attn.to_v(ctx).view(2, 7, 2, 8).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    ref = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(q_in, ctx), ref)
    assert set(attn.state_dict()) == {
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
        "to_out.0.bias",
    }


def test_swapping_the_scan_changes_outputs_not_parameters(x):
    blocks = {
        name: ZigMaBlock(DIM, (4, 6), pattern, 1)
        for name, pattern in [("zigzag", "zigzag8"), ("sweep", "sweep2"), ("none", None)]
    }
    reference = blocks["zigzag"]
    randomise(reference, 7)
    for block in blocks.values():
        block.load_state_dict(reference.state_dict(), strict=True)
    c = torch.randn(2, DIM)
    outs = {name: block(x, c) for name, block in blocks.items()}
    assert not torch.allclose(outs["zigzag"], outs["sweep"])
    assert not torch.allclose(outs["zigzag"], outs["none"])
    # sweep2's layer 1 is the reversed raster: the same as no scan only if the mixer were
    # symmetric, which it is not.
    assert not torch.allclose(outs["sweep"], outs["none"])


def test_no_scan_is_a_plain_mamba_block(x):
    block = ZigMaBlock(DIM, pattern=None)
    assert block.zigzag is None
    randomise(block, 4)
    n = rms_norm(x, block.norm.weight)
    torch.testing.assert_close(block(x), x + n + block.mixer(n))


def test_explicit_orders_equal_the_named_pattern(x):
    named = ZigMaBlock(DIM, (4, 6), "zigzag8", 3)
    randomise(named, 5)
    explicit = ZigMaBlock(DIM, (4, 6), layer_orders("zigzag8", (4, 6), 4)[3])
    explicit.load_state_dict(named.state_dict())
    assert torch.equal(named(x), explicit(x))


def test_video_layers_run_the_mixer_per_frame_and_per_site():
    T, H, W = 3, 2, 4
    x = torch.randn(2, T * H * W, DIM)
    s_block = ZigMaBlock(DIM, (T, H, W), "video_st", 0)
    t_block = ZigMaBlock(DIM, (T, H, W), "video_st", 1)
    randomise(s_block, 8)
    t_block.load_state_dict(s_block.state_dict())
    n = rms_norm(x, s_block.norm.weight)
    frames = n.view(2, T, H * W, DIM)
    spatial = layer_orders("zigzag8", (H, W), 1)[0]
    y = s_block.mixer(frames[:, :, spatial].reshape(2 * T, H * W, DIM))
    y = y.view(2, T, H * W, DIM)[:, :, torch.argsort(spatial)].reshape(2, -1, DIM)
    torch.testing.assert_close(s_block(x), x + n + y)
    sites = n.view(2, T, H * W, DIM).transpose(1, 2).reshape(2 * H * W, T, DIM)
    y = t_block.mixer(sites).view(2, H * W, T, DIM).transpose(1, 2).reshape(2, -1, DIM)
    torch.testing.assert_close(t_block(x), x + n + y)


def test_bidirectional_block_has_the_official_parameter_names():
    block = ZigMaBlock(DIM, pattern=None, mixer="bidirectional")
    names = set(block.state_dict())
    for name in ["A_b_log", "D_b", "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias"]:
        assert f"mixer.{name}" in names
    assert block(torch.randn(2, 6, DIM)).shape == (2, 6, DIM)


def test_without_adaln_there_are_no_modulation_parameters(x):
    block = ZigMaBlock(DIM, (4, 6), adaln=False)
    assert not any("adaLN" in name for name in block.state_dict())
    with pytest.raises(ValueError, match="adaln=False"):
        block(x, torch.randn(2, DIM))


def test_errors(x):
    with pytest.raises(ValueError, match=r"without a grid: pass the tokens' grid=\(H, W\)"):
        ZigMaBlock(DIM, None, "zigzag8")(x)
    with pytest.raises(ValueError, match="mixer"):
        ZigMaBlock(DIM, (4, 6), mixer="attention")
    block = ZigMaBlock(DIM, (4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16, C\)"):
        block(x)  # 24 tokens for a 4 x 4 grid
    with pytest.raises(ValueError, match="c must have shape"):
        block(x[:, :16], torch.randn(2, DIM + 1))
    with pytest.raises(ValueError, match="no cross-attention"):
        block(x[:, :16], context=torch.randn(2, 3, DIM))
    with pytest.raises(ValueError, match="pass context"):
        ZigMaBlock(DIM, (4, 6), context_dim=8)(x, torch.randn(2, DIM))


def test_bf16_autocast(x):
    block = ZigMaBlock(DIM, (4, 6), context_dim=16)
    randomise(block, 9)
    c, context = torch.randn(2, DIM), torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, c, context)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = block(x, c, context)
    assert (out - ref).norm() / ref.norm() < 0.02


@pytest.mark.parametrize("backend", ["numba", "torch", "reference"])
@pytest.mark.parametrize("pattern", ["zigzag8", "video_st", None])
def test_an_empty_batch_runs_forward_and_backward(backend, pattern):
    grid = (2, 3, 4) if pattern == "video_st" else (4, 6)
    block = ZigMaBlock(DIM, grid, pattern, layer_idx=1)
    x = torch.randn(0, 24, DIM, requires_grad=True)
    with use_backend(selective_scan=backend):
        out = block(x, c=torch.randn(0, DIM))
        out.sum().backward()
    assert out.shape == (0, 24, DIM) and x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in block.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim must be a positive int"),
        ({"dim": 16.0}, "dim must be a positive int"),
        ({"layer_idx": None}, "layer_idx must be a non-negative int"),
        ({"layer_idx": 1.5}, "layer_idx must be a non-negative int"),
        ({"grid": (4.0, 6)}, "grid must be an int"),
        ({"ssm_cfg": {"d_state": 0}}, "d_state must be a positive int"),
        ({"ssm_cfg": {"expand": 0}}, "expand must be a positive number"),
        ({"ssm_cfg": {"expand": 0.01}}, r"expand \* d_model must be >= 1"),
        ({"ssm_cfg": {"d_conv": 0}}, "d_conv must be a positive int"),
        ({"ssm_cfg": {"dt_rank": -2}}, "dt_rank must be a positive int"),
    ],
)
def test_constructor_arguments_are_checked_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZigMaBlock(**{"dim": DIM, "grid": (4, 6), **kwargs})


def test_shape_errors_are_in_the_users_terms(x):
    block = ZigMaBlock(DIM, (4, 6))
    with pytest.raises(
        ValueError, match=rf"x must be tokens \(B, L, dim={DIM}\), got \(2, 24, 8\)"
    ):
        block(x[..., :8])
    with pytest.raises(ValueError, match="c has 3 rows for a batch of 2"):
        block(x, torch.randn(3, DIM))


def test_double_backward_is_a_clear_error(x):
    block = ZigMaBlock(DIM, (4, 6))
    randomise(block, 4)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(
        block(x, torch.randn(2, DIM)).square().sum(), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad.square().sum().backward()


@pytest.mark.parametrize("mixer", ["mamba", "bidirectional", "cross"])
def test_compiles_without_graph_breaks_forward_and_backward(mixer):
    block = ZigMaBlock(DIM, (4, 6), "zigzag8", layer_idx=1, mixer=mixer)
    randomise(block, 11)
    x, c = torch.randn(2, 24, DIM), torch.randn(2, DIM)
    explanation = torch._dynamo.explain(block)(x, c)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # aot_eager: traces every op through its fake rule and autograd rule, without inductor.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, block):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, c)
        grads = torch.autograd.grad(out.square().sum(), [leaf, *block.parameters()])
        results.append([out.detach(), *grads])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
