"""ZigMaTransformer2DModel and ZigMaPipeline: diffusers' conventions, its flow-matching
scheduler against this library's Euler sampler, saving, checkpointing, zigma train checkpoints."""

import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from helpers import checkpointed_gradients_match  # noqa: E402

from zigzag_mamba import ZigMaBackbone  # noqa: E402
from zigzag_mamba.integrations.diffusers import (  # noqa: E402
    ZigMaPipeline,
    ZigMaTransformer2DModel,
    flow_match_sigmas,
)
from zigzag_mamba.train.samplers import guided_model, sample_ode  # noqa: E402

TINY = {"sample_size": 8, "in_channels": 1, "dim": 32, "depth": 2, "num_classes": 10}


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = ZigMaTransformer2DModel(**TINY).eval()
    with torch.no_grad():  # off the zero init, so that every part of the model matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_forward_maps_time_and_velocity_to_diffusers_conventions(model):
    backbone = model.to_backbone()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    t = torch.tensor([0.0, 0.3, 0.9])
    out = model(x, timestep=1000 * (1 - t), class_labels=y)
    assert isinstance(out, diffusers.models.modeling_outputs.Transformer2DModelOutput)
    torch.testing.assert_close(out.sample, -backbone(x, t, y), rtol=1e-6, atol=1e-6)
    (sample,) = model(x, 500.0, y, return_dict=False)  # a scalar timestep
    torch.testing.assert_close(sample, -backbone(x, torch.full((3,), 0.5), y))


@pytest.mark.parametrize("num_steps", [1, 5, 12])
def test_the_scheduler_loop_takes_sample_odes_euler_steps(model, num_steps):
    noise, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    backbone = model.to_backbone()
    with torch.no_grad():
        expected = sample_ode(lambda x, t: backbone(x, t, y), noise, num_steps, method="euler")
        # The documented loop, by hand.
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(sigmas=flow_match_sigmas(num_steps))
        x = noise
        for timestep in scheduler.timesteps:
            velocity = model(x, timestep.expand(4), class_labels=y).sample
            x = scheduler.step(velocity, timestep, x).prev_sample
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    pipe = ZigMaPipeline(model, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=y, latents=noise, num_inference_steps=num_steps, output_type="latent")
    torch.testing.assert_close(out.images, expected, rtol=1e-5, atol=1e-5)


def test_the_pipeline_guides_like_guided_model(model):
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 8])
    backbone = model.to_backbone()
    fn = guided_model(backbone, y, cfg_scale=3.0, null_label=10)
    with torch.no_grad():
        expected = sample_ode(fn, noise, 6, method="euler")
    pipe = ZigMaPipeline(model, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(y, latents=noise, num_inference_steps=6, guidance_scale=3.0, output_type="latent")
    torch.testing.assert_close(out.images, expected, rtol=1e-5, atol=1e-5)
    images = pipe(y, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    assert len(pipe(y, num_inference_steps=2, output_type="pil").images) == 2


def test_pipeline_errors(model):
    pipe = ZigMaPipeline(model, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="guidance_scale: classifier-free guidance needs"):
        pipe(num_inference_steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 1, 8, 8\)"):
        pipe([1, 2], latents=torch.randn(2, 1, 4, 4), num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type must be"):
        pipe([1], num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        flow_match_sigmas(0)


def test_save_and_load_pretrained(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    loaded = ZigMaTransformer2DModel.from_pretrained(tmp_path / "model")
    assert loaded.config.sample_size == [8, 8] or loaded.config.sample_size == 8
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    assert torch.equal(loaded(x, 250.0, y).sample, model(x, 250.0, y).sample)
    pipe = ZigMaPipeline(model, FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    again = ZigMaPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(again.transformer(x, 250.0, y).sample, model(x, 250.0, y).sample)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    model.train()
    model.backbone.y_embedder.dropout_prob = 0.0  # no random label dropout between the runs
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    calls = checkpointed_gradients_match(
        model,
        lambda m: m(x, 300.0, y).sample.square().sum(),
        lambda m, recompute: m.enable_gradient_checkpointing(gradient_checkpointing_func=recompute),
    )
    assert model.is_gradient_checkpointing and len(calls) == 2
    model.disable_gradient_checkpointing()
    assert not model.backbone.grad_checkpointing


def test_a_backbone_converts_and_back(model):
    backbone = ZigMaBackbone(input_size=(8, 12), in_channels=2, dim=32, depth=2, pattern="sweep4")
    converted = ZigMaTransformer2DModel.from_backbone(backbone)
    assert converted.config.pattern == "sweep4" and list(converted.config.sample_size) == [8, 12]
    back = converted.to_backbone()
    assert back.config == backbone.config
    state, expected = back.state_dict(), backbone.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    video = ZigMaBackbone(
        input_size=8, in_channels=1, dim=32, depth=2, num_frames=2, pattern="video_st"
    )
    with pytest.raises(ValueError, match="backbone: ZigMaTransformer2DModel takes image models"):
        ZigMaTransformer2DModel.from_backbone(video)
    with pytest.raises(TypeError, match="backbone must be a ZigMaBackbone"):
        ZigMaTransformer2DModel.from_backbone(model)


TRAIN = [
    "train", "--data", "digits", "--batch-size", "8", "--model-arg", "dim=16",
    "--model-arg", "depth=2", "--sample-steps", "2", "--grid-rows", "2", "--grid-columns", "10",
    "--no-progress", "--log-every", "1", "--ckpt-every", "0", "--steps", "2",
]  # fmt: skip


def test_a_zigma_train_checkpoint_converts_to_diffusers_and_back(tmp_path):
    from zigzag_mamba.cli import main
    from zigzag_mamba.train.build import build_model
    from zigzag_mamba.train.checkpoint import load_checkpoint

    assert main([*TRAIN, "--out-dir", str(tmp_path / "run")]) == 0
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    trained = build_model(state["config"]["model"]).eval()
    trained.load_state_dict(state["ema"])
    model = ZigMaTransformer2DModel.from_zigma_checkpoint(path).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.8]), torch.tensor([0, 5, 9])
    torch.testing.assert_close(model(x, 1000 * (1 - t), y).sample, -trained(x, t, y))
    back = model.to_backbone()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state["ema"].items())
    weights = ZigMaTransformer2DModel.from_zigma_checkpoint(path, weights="model")
    assert torch.equal(
        weights.backbone.blocks[0].mixer.in_proj.weight,
        state["model"]["blocks.0.mixer.in_proj.weight"],
    )
    assert main([*TRAIN, "--path", "gvp", "--out-dir", str(tmp_path / "gvp")]) == 0
    with pytest.raises(ValueError, match=r"path: .* was trained with path='gvp'"):
        ZigMaTransformer2DModel.from_zigma_checkpoint(tmp_path / "gvp" / "checkpoints" / "last.pt")


def test_without_diffusers_the_import_names_the_extra():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "try:\n"
        "    import zigzag_mamba.integrations.diffusers\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'zigzag-mamba[diffusers]'" in result.stdout, result.stderr


# --------------------------------------------------------------------------- diffusers' features


def sample(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([250.0, 700.0]), torch.tensor([1, 7])


def test_the_same_input_gives_the_same_output_and_a_training_step_reaches_every_parameter(model):
    x, timestep, y = sample(model)
    with torch.no_grad():
        assert torch.equal(model(x, timestep, y).sample, model(x, timestep, y).sample)
    model.train()
    model.backbone.y_embedder.dropout_prob = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = torch.randn_like(x)
    loss = (model(x, timestep, y).sample - target).square().mean()
    loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    with torch.no_grad():
        assert (model(x, timestep, y).sample - target).square().mean() < loss


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saved_in_a_dtype_and_as_a_variant(model, tmp_path, dtype):
    model.to(dtype).save_pretrained(tmp_path / "model", variant="half")
    assert (tmp_path / "model" / "diffusion_pytorch_model.half.safetensors").is_file()
    folder = tmp_path / "model"
    loaded = ZigMaTransformer2DModel.from_pretrained(folder, variant="half", torch_dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    saved, state = model.state_dict(), loaded.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    as_float = ZigMaTransformer2DModel.from_pretrained(folder, variant="half")  # float32
    x, timestep, y = sample(model)
    with torch.no_grad():
        assert torch.equal(as_float(x, timestep, y).sample, model.float()(x, timestep, y).sample)
    with pytest.raises(OSError):  # no such variant was saved
        ZigMaTransformer2DModel.from_pretrained(tmp_path / "model", variant="fp8")


def test_sharded_checkpoints_load_back_whole(model, tmp_path):
    model.save_pretrained(tmp_path / "model", max_shard_size="50KB")
    shards = sorted(p.name for p in (tmp_path / "model").glob("*.safetensors"))
    index = tmp_path / "model" / "diffusion_pytorch_model.safetensors.index.json"
    assert len(shards) > 1 and index.is_file()
    loaded = ZigMaTransformer2DModel.from_pretrained(tmp_path / "model")
    x, timestep, y = sample(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, timestep, y).sample, model(x, timestep, y).sample)


def test_layerwise_casting_stores_bf16_and_computes_in_float32(model):
    x, timestep, y = sample(model)
    with torch.no_grad():
        expected = model(x, timestep, y).sample
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        linear = [m for m in model.backbone.blocks.modules() if isinstance(m, torch.nn.Linear)]
        stored = {m.weight.dtype for m in linear}
        got = model(x, timestep, y).sample
    assert stored == {torch.bfloat16} and got.dtype == torch.float32
    # bf16 weights (8 bits of mantissa): close to the float32 model, not equal to it.
    error = (got - expected).norm() / expected.norm()
    assert 0 < error < 0.05, error


def test_device_map_auto_places_whole_blocks(model, tmp_path):
    pytest.importorskip("accelerate", reason="device_map needs accelerate")
    model.save_pretrained(tmp_path / "model")
    loaded = ZigMaTransformer2DModel.from_pretrained(tmp_path / "model", device_map="auto")
    assert set(loaded.hf_device_map.values()) == {"cpu"}
    x, timestep, y = sample(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, timestep, y).sample, model(x, timestep, y).sample)


def test_a_scheduler_without_sigmas_is_refused(model):
    from diffusers import DDPMScheduler

    with pytest.raises(TypeError, match=r"scheduler: .* DDPMScheduler takes no sigmas"):
        ZigMaPipeline(model, DDPMScheduler())


def test_a_saved_pipeline_folder_loads_through_diffusion_pipeline(model, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = ZigMaPipeline(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(tmp_path / "pipe")
    generic = DiffusionPipeline.from_pretrained(tmp_path / "pipe", trust_remote_code=True)
    direct = ZigMaPipeline.from_pretrained(tmp_path / "pipe")
    assert type(generic).__name__ == type(direct).__name__ == "ZigMaPipeline"
    assert generic.scheduler.config.shift == direct.scheduler.config.shift == 3.0
    latents, y = torch.randn(2, 1, 8, 8), [2, 5]
    runs = [p(y, latents=latents, num_inference_steps=3, output_type="latent").images
            for p in (pipe, generic, direct)]  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    with pytest.raises(FileNotFoundError, match=r"model_index.json: not found"):
        ZigMaPipeline.from_pretrained(tmp_path)
