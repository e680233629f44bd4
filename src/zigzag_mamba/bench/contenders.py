"""What the benchmarks compare: ZigMa blocks and backbones, and the attention ones users would
pick instead (a DiT block and a DiT-B-sized backbone, built here because the library has none).

Every contender becomes a :class:`Workload`: a callable with fixed inputs that can run forward
only (no autograd, as in sampling) or forward and backward (as in training, with fresh gradients
of every parameter and input each call).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zigzag_mamba.models.backbone import CONFIGS, ZigMaBackbone
from zigzag_mamba.modules.block import ZigMaBlock, modulate
from zigzag_mamba.modules.embed import PatchEmbed, TimestepEmbedder, sincos_2d, unpatchify
from zigzag_mamba.ops.backends import use_backend
from zigzag_mamba.orders import NO_PATTERN

BASELINE = "dit"  # the attention contender every ratio is taken against
OURS = "zigma"
UNPERMUTED = f"zigma-{NO_PATTERN}"  # the same block, pattern=None: what its token order costs
LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 8  # a 256^2 image is a 32^2 latent, as with DiT's VAE
# The ZigMa block runs order 1 of zigzag8 (a column snake, the strided gather): the costlier of
# the two kinds of order a ZigMa backbone alternates between.
LAYER_IDX = 1


class DiTBlock(nn.Module):
    """A DiT block: adaLN-Zero modulation, multi-head attention (SDPA) and an MLP of ratio 4.

    Example::

        >>> DiTBlock(64, heads=4)(torch.randn(2, 16, 64), torch.randn(2, 64)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = int(dim * mlp_ratio)
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **factory),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, dim, **factory),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, **factory))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, dim_head)
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa[:, None] * self._attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTBackbone(nn.Module):
    """A DiT denoiser (unconditional): patches + fixed 2-D sin-cos positions, timestep
    conditioning, ``depth`` :class:`DiTBlock` and an adaLN final layer. DiT-B is 768 x 12 with
    12 heads.

    Example::

        >>> DiTBackbone(8, dim=64, depth=2, heads=4)(torch.randn(2, 4, 8, 8), torch.rand(2)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int = 2,
        in_channels: int = LATENT_CHANNELS,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.patch_size, self.in_channels = patch_size, in_channels
        self.grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, dim, **factory)
        self.t_embedder = TimestepEmbedder(dim, **factory)
        table = sincos_2d(dim, self.grid, self.grid).to(device=device, dtype=dtype or torch.float32)
        self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, **factory) for _ in range(depth))
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, **factory))
        self.linear = nn.Linear(dim, patch_size * patch_size * in_channels, **factory)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t * 1000)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = self.linear(modulate(self.norm_final(h), shift, scale))
        return unpatchify(h, (self.grid, self.grid), self.patch_size)


def grid_for(length: int) -> tuple[int, int]:
    """The most nearly square (H, W) grid of ``length`` tokens with H a power of two <= W."""
    height = 2 ** (int(math.log2(length)) // 2)
    if length % height:
        raise ValueError(f"token counts must be multiples of {height}, got {length}")
    return height, length // height


@torch.no_grad()
def randomize_modulation(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Give every adaLN layer small random weights: zero gates would be a model at init, not
    one that is trained (the arithmetic is the same, but no path should be trivially zero)."""
    for sub in module.modules():
        modulation = getattr(sub, "adaLN_modulation", None)
        if isinstance(modulation, nn.Sequential):
            nn.init.normal_(modulation[1].weight, std=std)
            nn.init.normal_(modulation[1].bias, std=std)
    return module


Builder = Callable[[int, int, torch.device, torch.dtype], nn.Module]


@dataclass(frozen=True)
class Contender:
    """A named module builder: ``build(width, size, device, dtype)``, where size is the token
    count for blocks and the latent side for backbones. ``stand_in`` names the block contender
    that runs the same kernels, to load them at a tiny size before measuring. An ``optional``
    contender needs an optional package and runs only when named."""

    name: str
    label: str
    build: Builder
    stand_in: str
    optional: bool = False


def _zigma_block(pattern: str | None, mixer: str = "mamba") -> Builder:
    def build(dim: int, length: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
        grid = grid_for(length) if pattern is not None else None
        return ZigMaBlock(dim, grid, pattern, LAYER_IDX, mixer=mixer, device=device, dtype=dtype)

    return build


def _mamba_ssm_block(dim: int, length: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The zigzag8 block with mamba-ssm's own Mamba as the mixer (its fused path: one autograd
    function from in_proj to out_proj, on the causal-conv1d package's kernel). Needs both
    packages and a GPU."""
    from mamba_ssm import Mamba as FusedMamba

    block = _zigma_block("zigzag8")(dim, length, device, dtype)
    block.mixer = FusedMamba(dim, layer_idx=LAYER_IDX, device=device, dtype=dtype)
    return block


def _dit_block(dim: int, length: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return DiTBlock(dim, heads=max(dim // 64, 1), device=device, dtype=dtype)


def _zigma_backbone(dim: int, latent: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    config = {**CONFIGS["ZigMa-B/2"], "dim": dim}
    return ZigMaBackbone(
        input_size=latent, in_channels=LATENT_CHANNELS, device=device, dtype=dtype, **config
    )


def _dit_backbone(dim: int, latent: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return DiTBackbone(latent, dim=dim, heads=max(dim // 64, 1), device=device, dtype=dtype)


BLOCKS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("zigma", "ZigMa block (zigzag8)", _zigma_block("zigzag8"), "zigma"),
        Contender(UNPERMUTED, "ZigMa block (pattern=None)", _zigma_block(None), UNPERMUTED),
        Contender("vim", "Vim block (bidirectional)", _zigma_block(None, "bidirectional"), "vim"),
        Contender("cross", "cross block (sweep4, k = 4)", _zigma_block("sweep4", "cross"), "cross"),
        Contender("dit", "DiT block (attention)", _dit_block, "dit"),
        Contender(
            "zigma-mamba-ssm",
            "ZigMa block (mamba-ssm's fused Mamba)",
            _mamba_ssm_block,
            "zigma-mamba-ssm",
            optional=True,
        ),
    )
}


def default_names(table: dict[str, Contender]) -> list[str]:
    """The contenders a sweep runs unless told otherwise: every one that is not optional."""
    return [name for name, contender in table.items() if not contender.optional]


BACKBONES: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("zigma", "ZigMa-B/2 (24 x Mamba)", _zigma_backbone, "zigma"),
        Contender("dit", "DiT-B/2 (12 x attention)", _dit_backbone, "dit"),
    )
}


DEFAULT_COMPILE = "default"


def uses_cudagraphs(compile: str | bool) -> bool:
    """Whether torch.compile's ``compile`` mode records CUDA graphs (on CUDA tensors)."""
    return compile == "reduce-overhead"


@dataclass
class Workload:
    """``fn(*inputs)`` run forward only or forward and backward; ``backends`` are forced while
    it runs (see :func:`zigzag_mamba.use_backend`). The output has the first input's shape.
    ``cudagraphs``: ``fn`` replays CUDA graphs, and each call starts a new step of them."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    module: nn.Module | None = None
    backends: dict[str, str] = field(default_factory=dict)
    cudagraphs: bool = False

    def __post_init__(self) -> None:
        self._leaves = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in self.inputs)
        self._grad_out = torch.randn_like(self.inputs[0])

    def forward(self) -> None:
        self._new_step()
        with torch.no_grad(), use_backend(**self.backends):
            self.fn(*self.inputs)

    def forward_backward(self) -> None:
        self._new_step()
        if self.module is not None:
            self.module.zero_grad(set_to_none=True)
        for leaf in self._leaves:
            leaf.grad = None
        with use_backend(**self.backends):
            self.fn(*self._leaves).backward(self._grad_out)

    def _new_step(self) -> None:
        # The previous call's outputs may be overwritten: they are never kept.
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def run(self, mode: str) -> None:
        """``mode`` is ``"fwd"`` or ``"fwd+bwd"``."""
        (self.forward if mode == "fwd" else self.forward_backward)()


def _workload(module: nn.Module, inputs: tuple[torch.Tensor, ...], compile: str | bool) -> Workload:
    """``compile``: "" or False for eager, True or a torch.compile mode ("default",
    "reduce-overhead", ...) for a compiled module (one static-shape graph per size)."""
    if not compile:
        return Workload(module, inputs, module)
    mode = None if compile is True or compile == DEFAULT_COMPILE else compile
    fn = torch.compile(module, mode=mode, dynamic=False)
    return Workload(fn, inputs, module, cudagraphs=uses_cudagraphs(compile))


def block_workload(
    name: str,
    dim: int,
    length: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: str | bool = False,
) -> Workload:
    """Block ``name`` of width ``dim`` on ``batch`` x ``length`` tokens with conditioning."""
    module = randomize_modulation(BLOCKS[name].build(dim, length, device, dtype))
    x = torch.randn(batch, length, dim, device=device, dtype=dtype)
    c = torch.randn(batch, dim, device=device, dtype=dtype)
    return _workload(module, (x, c), compile)


def backbone_workload(
    name: str,
    dim: int,
    image: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: str | bool = False,
) -> Workload:
    """Backbone ``name`` on the latents of ``batch`` images of side ``image`` at time t."""
    latent = image // LATENT_DOWNSAMPLE
    module = randomize_modulation(BACKBONES[name].build(dim, latent, device, dtype))
    x = torch.randn(batch, LATENT_CHANNELS, latent, latent, device=device, dtype=dtype)
    t = torch.rand(batch, device=device)
    return _workload(module, (x, t), compile)


def backbone_tokens(image: int) -> int:
    """Token count of a backbone on ``image``-sided images (patch 2 on the latent)."""
    side = image // LATENT_DOWNSAMPLE // CONFIGS["ZigMa-B/2"]["patch_size"]
    return side * side


def parameter_count(workload: Workload) -> int:
    return 0 if workload.module is None else sum(p.numel() for p in workload.module.parameters())


def paired_order_blocks(
    dim: int, length: int, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Workload]:
    """The zigzag8 block and the ``pattern=None`` block with the same weights and the same inputs:
    the two sides of what the token order costs."""
    zigzag = block_workload("zigma", dim, length, batch, device, dtype)
    plain = block_workload("zigma-none", dim, length, batch, device, dtype)
    plain.module.load_state_dict(zigzag.module.state_dict())
    return {"zigzag8": zigzag, "pattern=None": Workload(plain.module, zigzag.inputs, plain.module)}
