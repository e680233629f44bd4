"""The ``zigma train`` and ``zigma sample`` commands.

Options come from flags, optionally on top of a YAML or JSON file (``--config``) whose keys
are the flag names with underscores, plus ``data``, ``image_size``, ``random_flip``, ``video`` and
``model`` (a preset name, or a mapping with ``name`` and ZigMaBackbone arguments). With
``--resume``, the run's own ``config.json`` (or its checkpoint's config) takes the defaults'
place. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import sys
from pathlib import Path
from typing import Any

from zigzag_mamba.cli import add_threads_argument, positive_int, set_threads
from zigzag_mamba.train.apps.options import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    RUN_KEYS,
    resolve_train_options,
)
from zigzag_mamba.train.config import OptionError, TrainConfig, add_flags, check_device
from zigzag_mamba.train.samplers import ODE_METHODS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def _guidance_scale(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _guided_channels(text: str) -> str | int:
    if text == "all":
        return text
    try:
        return positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"must be 'all' or a positive integer, got {text}"
        ) from None


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_sample(subparsers)


# -- zigma train ---------------------------------------------------------------------------


def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a ZigMa model with stochastic interpolants",
        description=(
            "Train a ZigMaBackbone on images or latents. Several processes: "
            "torchrun --nproc_per_node N -m zigzag_mamba train ..."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of options; flags override it")
    parser.add_argument(
        "--data",
        help="'digits', 'moving-digits' (clips of them moving), a folder of images (of clips "
        "with --video), or a .pt/.safetensors file of 'latents' or 'videos' "
        f"(default: {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="resize and centre-crop images to this (default: keep their size, which must be "
        "the same for all)",
    )
    parser.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        help="flip images left-right at random (image folders only; default: no)",
    )
    parser.add_argument(
        "--video",
        action=argparse.BooleanOptionalAction,
        help="read the --data folder as clips: animated GIFs or folders of frames, one "
        "sub-folder per class optional (default: no)",
    )
    parser.add_argument(
        "--model", help=f"a ZigMa preset, e.g. ZigMa-B/2 (default: {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="a ZigMaBackbone argument, e.g. depth=8 or pattern=zigzag8 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue from a checkpoint (no value: OUT_DIR/checkpoints/last.pt if present), "
        "with the options of the run's config.json as defaults",
    )
    add_threads_argument(parser)
    add_flags(parser.add_argument_group("training options (TrainConfig)"), TrainConfig)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from zigzag_mamba.train.build import build_model, model_spec
    from zigzag_mamba.train.checkpoint import CheckpointError, CheckpointWriteError
    from zigzag_mamba.train.data import open_dataset
    from zigzag_mamba.train.lock import RunFolderBusy, RunLock
    from zigzag_mamba.train.trainer import NonFiniteLossError, Trainer

    set_threads(args)
    try:
        config, run = resolve_train_options(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"zigma train: {exc}") from exc
    try:
        dataset = open_dataset(
            run["data"],
            image_size=run["image_size"],
            random_flip=run["random_flip"],
            video=run["video"],
            seed=config.seed,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"zigma train: {exc}") from exc
    overrides = dict(run["model"])  # a resumed run's: the whole spec, sizes included
    data_shape = tuple(dataset[0][0].shape)
    num_classes = int(getattr(dataset, "num_classes", 0))
    spec = model_spec(
        overrides.pop("name"),
        data_shape=data_shape,
        num_classes=overrides.pop("num_classes", num_classes),
        cfg_dropout=config.cfg_dropout,
        **overrides,
    )
    _check_data_fits(run["data"], data_shape, num_classes, spec)
    torch.manual_seed(config.seed)  # every process starts from the same weights
    try:
        trainer = Trainer(build_model(spec), dataset, config, model_config=spec)
    except (ValueError, ImportError) as exc:  # a --vae that cannot be loaded or does not fit
        raise SystemExit(f"zigma train: {exc}") from exc
    out = Path(config.out_dir)
    try:
        # The folder is locked, and the checkpoint to resume read, before anything is written.
        with RunLock(out) if trainer.main else contextlib.nullcontext():
            if run["resume"] is not None:
                trainer.resume(run["resume"])
            if trainer.main:
                _write_run_config(config, run, spec)
            summary = trainer.fit()
    except (NonFiniteLossError, CheckpointError, CheckpointWriteError, RunFolderBusy) as exc:
        print(f"zigma train: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"zigma train: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(
            f"zigma train: {exc}"
            if exc.filename is None
            else f"zigma train: could not write {exc.filename} ({exc.strerror}); the last "
            f"checkpoint, {trainer.last_checkpoint}, is intact",
            file=sys.stderr,
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.main:
        print(f"trained to step {summary['step']} (last loss {summary['loss']:.4f})")
        written = {
            "checkpoint": summary["checkpoint"],
            "loss log": out / "loss.csv",
            "samples": out / "samples",
        }
        for name, path in written.items():
            if path is not None and Path(path).exists():
                print(f"{name + ':':11} {path}")
    return 0


def _check_data_fits(
    data: str, shape: tuple[int, ...], num_classes: int, spec: dict[str, Any]
) -> None:
    size = spec["input_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    frames = [spec["num_frames"]] if spec.get("num_frames") else []
    expected = [*frames, spec["in_channels"], *size]
    if expected == list(shape) and spec["num_classes"] == num_classes:
        return
    describe = lambda s, k: f"{'x'.join(map(str, s))}, {k} classes"
    raise SystemExit(
        f"zigma train: the data {data!r} ({describe(shape, num_classes)}) does not fit the "
        f"model ({describe(expected, spec['num_classes'])}); a resumed run needs the data it "
        "was trained on (--data, --image-size, --video)"
    )


def _write_run_config(config: TrainConfig, run: dict[str, Any], spec: dict[str, Any]) -> None:
    from zigzag_mamba.train.checkpoint import write_atomically

    resolved = {**config.to_dict(), **{k: run[k] for k in RUN_KEYS}}
    resolved["model"] = spec
    write_atomically(Path(config.out_dir) / "config.json", json.dumps(resolved, indent=2) + "\n")


# -- zigma sample --------------------------------------------------------------------------


def _register_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="draw samples from a trained checkpoint into a PNG grid",
        description="Sample a checkpoint written by `zigma train` (EMA weights by default).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint file (…/checkpoints/last.pt)")
    parser.add_argument(
        "--out",
        default="samples.png",
        help="PNG grid to write (clips: their frame strips, and an animated GIF beside it)",
    )
    parser.add_argument(
        "--num",
        type=positive_int,
        help="number of samples (default: a row of --columns per class, or 64 unconditionally)",
    )
    parser.add_argument(
        "--columns", type=positive_int, default=8, help="images (or GIF clips) per grid row"
    )
    parser.add_argument(
        "--labels",
        type=int,
        nargs="+",
        help="class ids, cycled over the samples (default: one class per row, row i class i)",
    )
    parser.add_argument(
        "--cfg-scale", type=_guidance_scale, default=4.0, help="guidance scale (1: none)"
    )
    parser.add_argument(
        "--cfg-channels",
        type=_guided_channels,
        default="all",
        help="'all', or k to guide channels 0..k-1 only (3: DiT/SiT parity)",
    )
    parser.add_argument(
        "--sampler",
        choices=["ode", "sde"],
        default="ode",
        help="ode: deterministic (--method); sde: Euler-Maruyama, fresh noise every step",
    )
    parser.add_argument(
        "--method",
        default="heun",
        choices=ODE_METHODS,
        metavar="METHOD",
        help="ODE method: euler, heun, or one of torchdiffeq's (dopri5, rk4, ...)",
    )
    parser.add_argument("--steps", type=positive_int, default=50, help="sampler steps")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the starting noise (and the SDE's noise)"
    )
    parser.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="the EMA of the weights, or the weights of the last step",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:1, ..."
    )
    parser.add_argument(
        "--vae",
        help="decode latent samples to images with this diffusers AutoencoderKL (hub name or "
        "folder; default: the run's --vae, if it had one)",
    )
    parser.add_argument(
        "--save-tensor", help="also save the raw samples (latents, if decoded) and labels to a .pt"
    )
    add_threads_argument(parser)
    parser.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    import torch

    from zigzag_mamba.train.build import load_model
    from zigzag_mamba.train.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_checkpoint
    from zigzag_mamba.train.images import save_samples
    from zigzag_mamba.train.interpolant import Interpolant
    from zigzag_mamba.train.samplers import generate

    set_threads(args)
    _check_sample_arguments(args)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    try:
        state = load_checkpoint(args.ckpt, required=CHECKPOINT_KEYS)
        spec, train = state["config"]["model"], state["config"]["train"]
        model = load_model(state, args.weights, args.ckpt)
    except (CheckpointError, FileNotFoundError) as exc:
        raise SystemExit(f"zigma sample: {exc}") from exc
    channels = spec["in_channels"]
    if args.cfg_channels != "all" and args.cfg_channels > channels:
        raise SystemExit(
            f"zigma sample: --cfg-channels {args.cfg_channels}: the model has {channels} "
            f"channels; give 'all' or at most {channels}"
        )
    model.to(device).eval()
    codec = _sample_codec(args.vae or train.get("vae"), spec, device)
    interpolant = Interpolant(
        train["path"],
        train["prediction"],
        train["weighting"],
        train_eps=train["train_eps"],
        sample_eps=train["sample_eps"],
    )
    generator = torch.Generator(device).manual_seed(args.seed)
    frames = [spec["num_frames"]] if spec.get("num_frames") else []
    shape = (*frames, spec["in_channels"], *spec["input_size"])
    if args.num is None:
        args.num = args.columns * spec["num_classes"] if spec["num_classes"] else 64
    noise = torch.randn((args.num, *shape), generator=generator, device=device)
    labels = _sample_labels(args, spec["num_classes"], device)
    samples = generate(
        model,
        noise,
        labels=labels,
        interpolant=interpolant,
        cfg_scale=args.cfg_scale,
        null_label=spec["num_classes"] if spec.get("class_dropout_prob", 0) > 0 else None,
        channels=args.cfg_channels,
        sampler=args.sampler,
        method=args.method,
        num_steps=args.steps,
        generator=generator,
    )
    pictures = samples if codec is None else codec.decode(samples)
    written = save_samples(pictures, args.out, args.columns)
    if frames:
        print(f"wrote {args.num} clips to {written[0]} (frame strips) and {written[1]} (animated)")
    else:
        print(f"wrote {args.num} samples to {written[0]}")
    if args.save_tensor:
        torch.save({"samples": samples.cpu(), "labels": labels}, args.save_tensor)
        print(f"wrote the raw samples to {args.save_tensor}")
    return 0


def _sample_codec(vae: str | None, spec: dict[str, Any], device):
    """The run's VAE, loaded before any sampling, or None."""
    if not vae:
        return None
    from zigzag_mamba.train.vae import LatentCodec

    try:
        codec = LatentCodec.load(vae, device)
    except (ValueError, ImportError) as exc:
        raise SystemExit(f"zigma sample: {exc}") from None
    if codec.latent_channels != spec["in_channels"]:
        raise SystemExit(
            f"zigma sample: --vae {vae!r} makes {codec.latent_channels}-channel latents, the "
            f"model {spec['in_channels']}"
        )
    return codec


def _check_sample_arguments(args: argparse.Namespace) -> None:
    """What can be checked before the checkpoint is read, each naming its flag."""
    from zigzag_mamba.train.images import GRID_SUFFIXES

    if Path(args.out).suffix.lower() not in GRID_SUFFIXES:
        raise SystemExit(
            f"zigma sample: --out {args.out}: the grid's file name must end in one of "
            f"{', '.join(GRID_SUFFIXES)}"
        )
    try:
        check_device("device", args.device)
    except OptionError as exc:
        raise SystemExit(f"zigma sample: {exc.for_flags()}") from None


def _sample_labels(args: argparse.Namespace, num_classes: int, device):
    import torch

    if not num_classes:
        if args.labels:
            raise SystemExit("this checkpoint is unconditional; drop --labels")
        return None
    if args.labels:
        pool = torch.tensor(args.labels, device=device)
        if pool.min() < 0 or pool.max() >= num_classes:
            raise SystemExit(f"--labels must be in [0, {num_classes - 1}]")
        return pool[torch.arange(args.num, device=device) % len(pool)]
    return (torch.arange(args.num, device=device) // args.columns) % num_classes
