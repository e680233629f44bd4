"""A transformers ViT on scikit-learn's 8 x 8 digits, with its attention and with ZigMa mixers.

The proof that :func:`zigzag_mamba.integrations.replace_attention` makes a working model out of
a real ViT: the same ``ViTForImageClassification`` (patch size 1, so 64 patch tokens and a
class token), built from the same seed, trained on the same batches for the same number of
steps, once as it is and once converted (zigzag8 orders, the class token read last). Reported:
the test accuracy of both on a held-out fifth of the digits (stratified, fixed split), the
parameter counts and the training time (the time is informative only: the machine is shared).

Needs the ``train`` extra (scikit-learn) and transformers::

    python benchmarks/bench_vit_digits.py     # minutes on an idle 2-core CPU, far more if shared
    python benchmarks/bench_vit_digits.py --steps 200 --out /tmp/quick.md   # a quick look

Writes a Markdown table to ``--out`` and the numbers beside it as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from zigzag_mamba.bench.timing import machine_info
from zigzag_mamba.integrations import replace_attention

RESULTS = Path(__file__).parent / "results"


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    """Train and test images (N, 1, 8, 8) in [-1, 1] and their labels: a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.tensor(data.target)
    train, test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy()
    )
    return x[train], y[train], x[test], y[test]


def build(args: argparse.Namespace, converted: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=1,
        num_channels=1,
        hidden_size=args.dim,
        num_hidden_layers=args.depth,
        num_attention_heads=args.heads,
        intermediate_size=2 * args.dim,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)
    return replace_attention(model, pattern="zigzag8") if converted else model


def shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to one pixel in each direction (zero-filled edges)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)[:, 0]  # (N, 10, 10)
    rows, cols = torch.randint(0, 3, (2, x.shape[0], 1, 1), generator=generator)
    steps = torch.arange(8)
    samples = torch.arange(x.shape[0])[:, None, None]
    return padded[samples, rows + steps[:, None], cols + steps[None, :]][:, None]


def train_and_test(args: argparse.Namespace, converted: bool, data: tuple) -> dict:
    x_train, y_train, x_test, y_test = data
    model = build(args, converted)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for both models
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(0, len(y_train), (args.batch_size,), generator=generator)
        logits = model(pixel_values=shifted(x_train[index], generator)).logits
        loss = nn.functional.cross_entropy(logits, y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(pixel_values=x).logits.argmax(-1) for x in x_test.split(256)])
    return {
        "model": "ZigMa mixers (zigzag8)" if converted else "attention",
        "test_accuracy": float((predicted == y_test).float().mean()),
        "final_train_loss": loss.item(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
    }


def markdown(report: dict) -> list[str]:
    """The report as Markdown lines."""
    s, info, runs = report["settings"], report["machine"], report["runs"]
    lines = [
        "# A transformers ViT on the 8 x 8 digits: attention against ZigMa mixers",
        "",
        f"`ViTForImageClassification`, patch size 1 (64 patch tokens + the class token), width "
        f"{s['dim']}, depth {s['depth']}, {s['heads']} heads; {s['steps']} steps of AdamW "
        f"(lr {s['lr']}, cosine), batch {s['batch_size']}, one-pixel random shifts; the same "
        f"seed ({s['seed']}), initial weights outside the attention, and batches for both. "
        f"Test set: a stratified fifth of the digits ({report['test_images']} images). "
        f"{info['cpu']}, {s['threads']} torch thread(s), torch {info['torch']}; train times "
        "are wall-clock on a machine that may be shared, informative only.",
        "",
        "| model | test accuracy | parameters | final train loss | train time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run['model']} | {100 * run['test_accuracy']:.1f}% | {run['parameters']:,} | "
            f"{run['final_train_loss']:.3f} | {run['train_seconds']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (and .json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"), torch.float32)
    out = args.out or RESULTS / info["machine"] / "vit_digits.md"
    data = digits(args.seed)
    runs = [train_and_test(args, converted, data) for converted in (False, True)]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"settings": settings, "machine": info, "test_images": len(data[3]), "runs": runs}
    lines = markdown(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
