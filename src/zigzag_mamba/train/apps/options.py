"""The options of a ``zigma train`` run: defaults, the ``--config`` file and flags merged, and
with ``--resume`` the resumed run's own options in the defaults' place, checked against what was
given."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from zigzag_mamba.train.config import OptionError, TrainConfig, read_config_file

DEFAULT_MODEL = "ZigMa-T/1"
DEFAULT_DATA = "digits"
# Options besides TrainConfig's that config.json records.
RUN_KEYS = ("data", "image_size", "random_flip", "video")
# What a resumed run may change: when checkpoints, logs and samples are written, where and how
# long it runs, and how it samples. The weights it goes on to learn are those one run would.
RESUME_MAY_CHANGE = frozenset(
    {
        "out_dir",
        "steps",
        "max_seconds",
        "device",
        "num_workers",
        "compile",
        "grad_checkpointing",
        "log_every",
        "ckpt_every",
        "sample_every",
        "sample_steps",
        "sample_method",
        "sample_eps",
        "cfg_scale",
        "grid_columns",
        "grid_rows",
        "eval_samples",
        "vae",
        "progress",
    }
)
# What it may change too, although the run then learns differently from that step on.
RESUME_CHANGES_LEARNING = frozenset(
    {"lr", "weight_decay", "beta1", "beta2", "warmup_steps", "grad_clip", "ema_decay", "precision"}
)
# Everything else (the data, the model, batch_size, grad_accum, seed, the interpolant's path,
# prediction, weighting and train_eps, cfg_dropout) must stay as the run had it.


def resolve_train_options(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """Merge defaults, the ``--config`` file and flags into a TrainConfig and run options.

    With ``--resume`` and a checkpoint to resume, the run's saved options replace the defaults,
    and an option given that differs from them is refused (:data:`RESUME_MAY_CHANGE` and
    :data:`RESUME_CHANGES_LEARNING` may change; they are reported).
    """
    options, model, origins = _given_options(args)
    resume = getattr(args, "resume", None)
    _check_resume_path(resume)
    out_dir = Path(options.get("out_dir", TrainConfig().out_dir))
    saved = _saved_run(resume, out_dir) if resume is not None else None
    base: dict[str, Any] = {
        "data": DEFAULT_DATA,
        "image_size": None,
        "random_flip": False,
        "video": False,
    }
    base_model: dict[str, Any] = {"name": DEFAULT_MODEL}
    if saved is not None:
        _check_resume(options, model, origins, saved, out_dir)
        base.update(saved["options"])
        base_model = dict(saved["model"]) or base_model
    values = {**base, **options}
    run = {key: values.pop(key) for key in RUN_KEYS}
    run["resume"] = resume
    run["model"] = {**base_model, **model}
    try:
        return TrainConfig.from_dict(values), run
    except OptionError as exc:
        raise SystemExit(f"zigma train: {_option_error(exc, origins, saved)}") from None


def _option_error(exc: OptionError, origins: dict, saved: dict[str, Any] | None) -> str:
    """The error said where the value came from: a flag, the --config file or the run's own
    config.json."""
    kind, where = origins.get(exc.name, ("saved", saved["source"] if saved else "the defaults"))
    if kind == "flag":
        return exc.for_flags()
    return f"{exc.name} = {exc.value!r} in {where}: must be {exc.allowed}"


def _check_resume_path(resume: str | None) -> None:
    """An explicit --resume must name a checkpoint that is there (or its previous one)."""
    if resume in (None, "auto"):
        return
    from zigzag_mamba.train.checkpoint import previous_path

    path = Path(resume)
    if path.is_dir():
        raise SystemExit(f"zigma train: --resume {resume}: a folder, not a checkpoint file")
    if not (path.is_file() or previous_path(path).is_file()):
        raise SystemExit(
            f"zigma train: --resume {resume}: no such checkpoint (nor {previous_path(path)}); "
            "--resume alone continues OUT_DIR/checkpoints/last.pt"
        )


def _given_options(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[str, str]]]:
    """What the ``--config`` file and the flags set (flags win): training and run options,
    model entries, and where each came from (``("flag", "--lr")`` or ``("file", path)``)."""
    options: dict[str, Any] = {}
    model: dict[str, Any] = {}
    origins: dict[str, tuple[str, str]] = {}
    path = getattr(args, "config", None)
    if path:
        values = read_config_file(path)
        file_model = values.pop("model", None)
        if file_model is not None:
            file_model = {"name": file_model} if isinstance(file_model, str) else dict(file_model)
            for key, value in file_model.items():
                model[key] = value
                origins["model." + key] = ("file", str(path))
        for key, value in values.items():
            options[key] = value
            origins[key] = ("file", str(path))
    for key in (*RUN_KEYS, *(f.name for f in dataclasses.fields(TrainConfig))):
        if hasattr(args, key):
            options[key] = getattr(args, key)
            origins[key] = ("flag", "--" + key.replace("_", "-"))
    if hasattr(args, "model"):
        model["name"] = args.model
        origins["model.name"] = ("flag", "--model")
    for item in getattr(args, "model_arg", None) or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        key = key.replace("-", "_")
        model[key] = _parse_value(text)
        origins["model." + key] = ("flag", "--model-arg")
    return options, model, origins


def _saved_run(resume: str, out_dir: Path) -> dict[str, Any] | None:
    """The options of the run a ``--resume`` continues: from ``OUT_DIR/config.json``, else from
    the checkpoint's own config. None when there is no checkpoint to resume (or it cannot be
    read: the trainer then says why)."""
    from zigzag_mamba.train.checkpoint import (
        CHECKPOINT_KEYS,
        CheckpointError,
        load_checkpoint_or_previous,
        previous_path,
    )

    checkpoint = out_dir / "checkpoints" / "last.pt" if resume == "auto" else Path(resume)
    if not (checkpoint.is_file() or previous_path(checkpoint).is_file()):
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(RUN_KEYS)
    config_file = out_dir / "config.json"
    if config_file.is_file():
        values = _read_run_config(config_file)
        source = str(config_file)
    else:
        try:
            with warnings.catch_warnings():  # the trainer warns when it loads it
                warnings.simplefilter("ignore")
                state, used = load_checkpoint_or_previous(checkpoint, required=CHECKPOINT_KEYS)
        except (CheckpointError, FileNotFoundError):
            return None
        config = state["config"] if isinstance(state["config"], dict) else {}
        values = {**config.get("train", {}), "model": config.get("model") or {}}
        source = f"the config stored in {used}"
    model = values.pop("model", None) or {}
    options = {k: v for k, v in values.items() if k in known and k != "out_dir"}
    return {"options": options, "model": model, "source": source}


def _read_run_config(path: Path) -> dict[str, Any]:
    """A run's config.json: an object of options with a ``model`` object, or an error naming
    the file."""
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(
            f"zigma train: {path} is not the JSON object zigma train writes ({exc}); "
            "restore it, or delete it to resume with the options the checkpoint recorded"
        ) from None
    if not isinstance(values, dict) or not isinstance(values.get("model", {}), dict):
        raise SystemExit(
            f"zigma train: {path} must hold an object of options with a 'model' object, got "
            f"{type(values).__name__}; delete it to resume from the checkpoint's options"
        )
    return values


def _check_resume(
    options: dict[str, Any],
    model: dict[str, Any],
    origins: dict[str, tuple[str, str]],
    saved: dict[str, Any],
    out_dir: Path,
) -> None:
    """Refuse options that differ from the resumed run's, naming each; report allowed changes."""
    refused, changed = [], []
    for key, value in options.items():
        if key == "out_dir" or key not in saved["options"]:
            continue
        before = saved["options"][key]
        if _same(value, before):
            continue
        item = _difference(origins[key], key, value, before)
        allowed = key in RESUME_MAY_CHANGE or key in RESUME_CHANGES_LEARNING
        (changed if allowed else refused).append(item)
    if saved["model"]:
        for key, value in model.items():
            before = _saved_model_value(saved["model"], key)
            if not _same(value, before):
                name = "model" if key == "name" else key
                refused.append(_difference(origins["model." + key], name, value, before))
    if refused:
        raise SystemExit(
            f"zigma train: --resume continues the run in {out_dir} as {saved['source']} "
            f"describes it, but these options differ from it: {'; '.join(refused)}. Drop them "
            "to continue the run, or start a new run in another --out-dir."
        )
    if changed:
        print(
            f"zigma train: resuming {out_dir} with options changed from {saved['source']}: "
            + "; ".join(changed),
            file=sys.stderr,
        )


def _difference(origin: tuple[str, str], name: str, value: Any, before: Any) -> str:
    """One option that differs from the run's, named as it was given: ``--lr 0.01 (the run:
    0.001)``, ``--model-arg depth=4 (the run: depth=2)``, ``lr: 0.01 in run.yaml (...)``."""
    kind, where = origin
    if kind == "file":
        return f"{name}: {_show(value)} in {where} (the run: {_show(before)})"
    if where == "--model-arg":
        return f"--model-arg {name}={_show(value)} (the run: {name}={_show(before)})"
    return f"{where} {_show(value)} (the run: {_show(before)})"


def _saved_model_value(spec: dict[str, Any], key: str) -> Any:
    """What ``key`` was in the model a saved spec builds: the spec's entry, else the preset's,
    else ZigMaBackbone's default."""
    if key in spec:
        return spec[key]
    from zigzag_mamba.models.backbone import CONFIGS
    from zigzag_mamba.models.config import ZigMaConfig

    preset = CONFIGS.get(spec.get("name"), {})
    if key in preset:
        return preset[key]
    defaults = {f.name: f.default for f in dataclasses.fields(ZigMaConfig)}
    return defaults.get(key)


def _same(a: Any, b: Any) -> bool:
    normal = lambda v: [normal(x) for x in v] if isinstance(v, list | tuple) else v
    return normal(a) == normal(b)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def _parse_value(text: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            return text
