"""ZigMa as a diffusers model, sampled with diffusers' flow-matching scheduler.

Needs diffusers: ``pip install 'zigzag-mamba[diffusers]'``.

Conventions. This library's time runs from noise to data: ``x_t = t * x_data + (1 - t) *
noise``, t = 0 is noise, and the model predicts the velocity ``x_data - noise``. diffusers'
flow matching (``FlowMatchEulerDiscreteScheduler``) runs the other way: ``x = (1 - sigma) *
x_data + sigma * noise``, sigma = 1 is noise, timesteps are ``sigma * num_train_timesteps``,
and the model predicts ``noise - x_data``. So, for the linear path with velocity prediction
(``zigma train``'s default)::

    t = 1 - sigma = 1 - timestep / num_train_timesteps        diffusers' output = -velocity

:class:`ZigMaTransformer2DModel` applies both maps in its forward, so it plugs into diffusers'
scheduler and pipelines as they are, and the Euler scheduler with ``sigmas = linspace(1, 1/N,
N)`` (:func:`flow_match_sigmas`) takes exactly the steps of ``sample_ode(method="euler",
num_steps=N)``.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from zigzag_mamba.integrations._optional import require
from zigzag_mamba.models.backbone import ZigMaBackbone
from zigzag_mamba.models.config import ZigMaConfig

require("diffusers", "diffusers", "zigzag_mamba.integrations.diffusers")

from diffusers import DiffusionPipeline, ImagePipelineOutput  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

try:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
except ImportError:  # diffusers before 0.29
    from diffusers.models.transformers.transformer_2d import Transformer2DModelOutput

#: The file beside a saved pipeline's model_index.json that names its class for diffusers.
PIPELINE_FILE = "pipeline.py"

__all__ = [
    "Transformer2DModelOutput",
    "ZigMaPipeline",
    "ZigMaTransformer2DModel",
    "flow_match_sigmas",
]

# The ZigMaConfig fields that the diffusers config holds under the same name.
_SHARED = (
    "patch_size",
    "in_channels",
    "dim",
    "depth",
    "pattern",
    "pos_embed",
    "num_classes",
    "class_dropout_prob",
    "context_dim",
    "mixer",
    "ssm_cfg",
    "norm_eps",
)


def flow_match_sigmas(num_steps: int) -> np.ndarray:
    """The sigmas that make diffusers' Euler scheduler take ``sample_ode``'s uniform steps:
    ``linspace(1, 1/N, N)`` (the scheduler appends the final 0).

    Example::

        >>> flow_match_sigmas(4).tolist()
        [1.0, 0.75, 0.5, 0.25]
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


class ZigMaTransformer2DModel(ModelMixin, ConfigMixin):
    """A :class:`~zigzag_mamba.ZigMaBackbone` as a diffusers model (images only).

    The config holds the backbone's :class:`~zigzag_mamba.ZigMaConfig` with diffusers' name
    ``sample_size`` for ``input_size``, and ``num_train_timesteps`` (1000), the scheduler's
    scale of timesteps. ``save_pretrained`` / ``from_pretrained``,
    ``enable_gradient_checkpointing()`` and the rest come from ``ModelMixin``. The weights
    are the backbone's, under ``backbone.``.

    Example::

        >>> model = ZigMaTransformer2DModel(sample_size=8, in_channels=1, dim=32, depth=2,
        ...                                 num_classes=10)
        >>> out = model(torch.randn(2, 1, 8, 8), timestep=torch.tensor([999.0, 500.0]),
        ...             class_labels=torch.tensor([3, 7]))
        >>> out.sample.shape
        torch.Size([2, 1, 8, 8])
    """

    _supports_gradient_checkpointing = True
    # The timestep MLP casts its sinusoidal features to its weights' dtype, which under
    # layerwise casting is the storage dtype (its weights are cast only when it runs): it stays
    # in the compute dtype, with the norms and positions diffusers keeps there anyway.
    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["t_embedder"]
    # A block keeps its residual stream and its mixer's state together on one device.
    _no_split_modules: ClassVar[list[str]] = ["ZigMaBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | list[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        dim: int = 768,
        depth: int = 24,
        pattern: str | None = "zigzag8",
        pos_embed: str = "learned",
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        context_dim: int | None = None,
        mixer: str = "mamba",
        ssm_cfg: dict | None = None,
        norm_eps: float = 1e-5,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        size = sample_size if isinstance(sample_size, int) else tuple(sample_size)
        # register_to_config has recorded every argument in self.config already.
        config = ZigMaConfig(input_size=size, **{name: self.config[name] for name in _SHARED})
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(
                f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}"
            )
        self.backbone = ZigMaBackbone(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """diffusers' flow-matching velocity ``noise - x_data`` at ``hidden_states``.

        Args:
            hidden_states: (B, C, H, W) noisy samples.
            timestep: scalar or (B,), in ``[0, num_train_timesteps]``; the maximum is pure noise.
            class_labels: (B,) labels of a class-conditional model.
            encoder_hidden_states: (B, S, context_dim) text tokens of a text-conditional model.
            return_dict: a ``Transformer2DModelOutput`` (else a 1-tuple).
        """
        dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        sigma = torch.as_tensor(timestep, device=hidden_states.device, dtype=dtype)
        t = 1 - sigma / self.config.num_train_timesteps
        velocity = self.backbone(hidden_states, t, class_labels, encoder_hidden_states)
        sample = -velocity
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    @classmethod
    def from_backbone(cls, backbone: ZigMaBackbone) -> ZigMaTransformer2DModel:
        """The same model, weights copied, from a :class:`~zigzag_mamba.ZigMaBackbone`."""
        if not isinstance(backbone, ZigMaBackbone):
            raise TypeError(f"backbone must be a ZigMaBackbone, got {type(backbone).__name__}")
        config = backbone.config
        if config.num_frames:
            raise ValueError("backbone: ZigMaTransformer2DModel takes image models, not video")
        if not isinstance(config.pattern, str | None):
            raise ValueError(
                "backbone: its pattern is explicit orders; register them with "
                "zigzag_mamba.register_pattern and build the backbone with that name"
            )
        options = {name: getattr(config, name) for name in _SHARED}
        model = cls(sample_size=list(config.input_size), **options)
        param = next(backbone.parameters())
        model.backbone.load_state_dict(backbone.state_dict(), strict=True)
        return model.to(device=param.device, dtype=param.dtype)

    def to_backbone(self) -> ZigMaBackbone:
        """A :class:`~zigzag_mamba.ZigMaBackbone` with a copy of these weights (this library's
        time and velocity again: ``backbone(x, t, y)``)."""
        return copy.deepcopy(self.backbone)

    @classmethod
    def from_zigma_checkpoint(
        cls, path: str | Path, weights: str = "ema"
    ) -> ZigMaTransformer2DModel:
        """Load a ``zigma train`` checkpoint (``checkpoints/last.pt``), verified, with its
        ``"ema"`` (default) or ``"model"`` weights.

        The run must have used the linear path with velocity prediction (the default), whose
        velocity is what diffusers' flow-matching schedulers integrate; other interpolants are
        refused. Needs the ``train`` extra.
        """
        from zigzag_mamba.train.build import load_model
        from zigzag_mamba.train.checkpoint import CHECKPOINT_KEYS, load_checkpoint

        if weights not in ("ema", "model"):
            raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
        state = load_checkpoint(path, required=CHECKPOINT_KEYS)
        train = state["config"]["train"]
        if (train.get("path"), train.get("prediction")) != ("linear", "velocity"):
            raise ValueError(
                f"path: {path} was trained with path={train.get('path')!r}, prediction="
                f"{train.get('prediction')!r}; diffusers' flow-matching schedulers need the "
                "linear path with velocity prediction"
            )
        return cls.from_backbone(load_model(state, weights, path))


class ZigMaPipeline(DiffusionPipeline):
    """Sample a :class:`ZigMaTransformer2DModel` with a flow-matching scheduler (diffusers'
    ``FlowMatchEulerDiscreteScheduler``), with classifier-free guidance for class labels.

    The model works in pixel space (no VAE): ``output_type="latent"`` returns its samples as
    they are; ``"pt"``, ``"np"`` and ``"pil"`` map them from [-1, 1] to [0, 1] images.

    Example::

        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> model = ZigMaTransformer2DModel(sample_size=8, in_channels=1, dim=32, depth=2,
        ...                                 num_classes=10)
        >>> pipe = ZigMaPipeline(model, FlowMatchEulerDiscreteScheduler())
        >>> images = pipe(class_labels=[1, 2], num_inference_steps=4, guidance_scale=2.0,
        ...               generator=torch.Generator().manual_seed(0), output_type="pt").images
        >>> images.shape
        torch.Size([2, 1, 8, 8])
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: ZigMaTransformer2DModel, scheduler: Any) -> None:
        super().__init__()
        takes = inspect.signature(getattr(scheduler, "set_timesteps", lambda: None)).parameters
        if "sigmas" not in takes:
            raise TypeError(
                f"scheduler: ZigMaPipeline integrates the model's flow-matching velocity with a "
                f"flow-matching scheduler whose timesteps it sets by sigmas "
                f"(FlowMatchEulerDiscreteScheduler); {type(scheduler).__name__} takes no sigmas"
            )
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' folder, with the pipeline's code beside it, so that
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds this class
        (``ZigMaPipeline.from_pretrained(folder)`` needs no such flag)."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = [PIPELINE_FILE.removesuffix(".py"), type(self).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (folder / PIPELINE_FILE).write_text(
            '"""This folder\'s pipeline, from zigzag-mamba (its diffusers extra)."""\n\n'
            "from zigzag_mamba.integrations.diffusers import ZigMaPipeline, "
            "ZigMaTransformer2DModel\n\n"
            '__all__ = ["ZigMaPipeline", "ZigMaTransformer2DModel"]\n'
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> ZigMaPipeline:
        """A folder :meth:`save_pretrained` wrote (its code file is not run: this class is
        the pipeline). ``kwargs`` go to the components' ``from_pretrained``."""
        import diffusers

        index_file = Path(folder) / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{index_file}: not found; ZigMaPipeline.from_pretrained takes a folder that "
                "ZigMaPipeline.save_pretrained wrote"
            )
        folder, index = index_file.parent, json.loads(index_file.read_text())
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        return cls(
            ZigMaTransformer2DModel.from_pretrained(folder / "transformer", **kwargs),
            scheduler_class.from_pretrained(folder, subfolder="scheduler"),
        )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images: one per label of ``class_labels`` (class-conditional models), or
        ``batch_size`` (unconditional), starting from ``latents`` (noise) when given.

        ``guidance_scale`` != 1 needs a model trained with label dropout
        (``class_dropout_prob > 0``), whose null class ``num_classes`` is the unconditional one.
        """
        model, config = self.transformer, self.transformer.config
        device = self._execution_device
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1)
            batch_size = labels.numel()
        guided = guidance_scale != 1.0
        if guided and (labels is None or config.class_dropout_prob <= 0):
            raise ValueError(
                "guidance_scale: classifier-free guidance needs class_labels and a model trained "
                "with label dropout (class_dropout_prob > 0)"
            )
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device)
        self.scheduler.set_timesteps(sigmas=flow_match_sigmas(num_inference_steps), device=device)
        if guided:
            null = torch.full_like(labels, config.num_classes)
            labels = torch.cat([labels, null])
        for timestep in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if guided else latents
            t = timestep.expand(x.shape[0])
            out = model(x, t, class_labels=labels, encoder_hidden_states=encoder_hidden_states)
            velocity = out.sample
            if guided:
                cond, uncond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, timestep, latents).prev_sample
        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _postprocess(self, samples: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return samples
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(
                f"output_type must be 'latent', 'pt', 'np' or 'pil', got {output_type!r}"
            )
        images = (samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)
