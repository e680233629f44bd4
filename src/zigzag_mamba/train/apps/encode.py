"""The ``zigma encode`` command: an image folder into a latent file, with a diffusers VAE
(:mod:`zigzag_mamba.train.vae`). Heavy imports happen inside the handler."""

from __future__ import annotations

import argparse

from zigzag_mamba.cli import add_threads_argument, positive_int, set_threads
from zigzag_mamba.train.apps.cli import HelpFormatter
from zigzag_mamba.train.config import OptionError, check_device


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode an image folder into a latent file with a diffusers VAE",
        description=(
            "Encode the images of a folder (one class per sub-folder, or unlabelled) with a "
            "diffusers AutoencoderKL into a data file for zigma train: latents scaled by the "
            "VAE's scaling factor, labels, and that scaling, so that a run with --vae can "
            "decode its samples. See docs/training.md."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("images", help="the image folder")
    parser.add_argument("out", help="the latent file to write (.safetensors or .pt)")
    parser.add_argument(
        "--vae",
        required=True,
        help="a diffusers AutoencoderKL: a hub name (stabilityai/sd-vae-ft-ema) or a folder",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        help="resize and centre-crop the images to this side (a multiple of the VAE's "
        "downsampling, 8 for Stable Diffusion's); default: keep their size",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:1, ..."
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar",
    )
    add_threads_argument(parser)
    parser.set_defaults(func=_encode)


def _encode(args: argparse.Namespace) -> int:
    import torch

    from zigzag_mamba.train.vae import LatentCodec, encode_folder

    set_threads(args)
    try:
        check_device("device", args.device)
    except OptionError as exc:
        raise SystemExit(f"zigma encode: {exc.for_flags()}") from None
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    try:
        codec = LatentCodec.load(args.vae, device)
        out = encode_folder(
            args.images,
            args.out,
            codec,
            image_size=args.image_size,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"zigma encode: {exc}") from None
    print(f"wrote the latents of {args.images} to {out}")
    print(f"train on them: zigma train --data {out} --vae {args.vae}")
    return 0
