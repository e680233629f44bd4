"""Which implementation each op runs on each device, and how to force one.

Every op registers its implementations here in order of preference. An implementation is
*available* when its probe succeeds; probes run lazily, once, at first use (never at import), so
an optional package that fails to import (mamba-ssm without a CUDA build, Triton without a
driver) simply makes that implementation unavailable.

The choice is ``"auto"`` (the first available implementation for the tensor's device) unless it
is forced, process-wide by an environment variable (``ZIGZAG_MAMBA_SELECTIVE_SCAN``,
``ZIGZAG_MAMBA_PERMUTE_TOKENS``) or locally by :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("auto", "fused", "torch", "reference", "mamba_ssm", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    # Returns None when usable, else a one-line reason. Exceptions count as unusable.
    probe: Callable[[], str | None]


_registry: dict[str, list[Backend]] = {}
_forced: dict[str, str] = {}


def env_var(op: str) -> str:
    return f"ZIGZAG_MAMBA_{op.upper()}"


def register_backend(
    op: str,
    name: str,
    device_types: tuple[str, ...],
    probe: Callable[[], str | None] = lambda: None,
) -> None:
    """Add an implementation of ``op``; earlier registrations are preferred by ``"auto"``."""
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {name!r}")
    backends = _registry.setdefault(op, [])
    if any(b.name == name for b in backends):
        raise ValueError(f"backend {name!r} is already registered for {op!r}")
    backends.append(Backend(name, device_types, probe))


@functools.cache
def unavailable_reason(op: str, name: str) -> str | None:
    """Why backend ``name`` of ``op`` cannot run here, or None if it can (probed once)."""
    backend = _find(op, name)
    try:
        return backend.probe()
    except Exception as exc:  # an optional dependency that fails to import is not our error
        return f"{type(exc).__name__}: {exc}"


def _find(op: str, name: str) -> Backend:
    if op not in _registry:
        raise ValueError(f"unknown op {op!r}; ops with backends: {sorted(_registry)}")
    for backend in _registry[op]:
        if backend.name == name:
            return backend
    names = [b.name for b in _registry[op]]
    raise ValueError(f"{op} has no backend {name!r}; choose one of {['auto', *names]}")


def requested(op: str) -> str:
    """The backend asked for ``op``: forced by :func:`use_backend`, else the env var, else auto."""
    if op in _forced:
        return _forced[op]
    choice = os.environ.get(env_var(op), "auto").strip() or "auto"
    if choice != "auto":
        _find(op, choice)  # a misspelt environment variable is an error, not a silent default
    return choice


def resolve(op: str, device_type: str) -> str:
    """The backend that runs ``op`` for tensors on ``device_type`` ("cpu", "cuda", ...)."""
    choice = requested(op)
    if choice != "auto":
        backend = _find(op, choice)
        if device_type not in backend.device_types:
            raise RuntimeError(
                f"{op} backend {choice!r} runs on {backend.device_types}, not on {device_type!r} "
                f"tensors; use 'auto' or one of {_names_for(op, device_type)}"
            )
        reason = unavailable_reason(op, choice)
        if reason is not None:
            raise RuntimeError(f"{op} backend {choice!r} is not available here: {reason}")
        return choice
    for backend in _registry[op]:
        if device_type in backend.device_types and unavailable_reason(op, backend.name) is None:
            return backend.name
    raise RuntimeError(f"no available {op} backend for {device_type!r} tensors")


def _names_for(op: str, device_type: str) -> list[str]:
    return [b.name for b in _registry[op] if device_type in b.device_types]


@contextlib.contextmanager
def use_backend(**choices: str) -> Iterator[None]:
    """Force the backend of one or more ops inside a ``with`` block.

    Example::

        with zigzag_mamba.use_backend(selective_scan="torch"):
            y = block(x)

    Forcing a backend that cannot run here raises a ``RuntimeError`` at once.
    """
    for op, name in choices.items():
        if op not in _registry:
            raise TypeError(f"use_backend() got unknown op {op!r}; ops: {sorted(_registry)}")
        if name != "auto":
            _find(op, name)
            reason = unavailable_reason(op, name)
            if reason is not None:
                raise RuntimeError(f"{op} backend {name!r} is not available here: {reason}")
    previous = dict(_forced)
    _forced.update(choices)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def device_types_here() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backends() -> dict[str, dict[str, str]]:
    """What each op resolves to on each device type of this machine.

    Example::

        >>> zigzag_mamba.backends()
        {'permute_tokens': {'cpu': 'torch'}, 'selective_scan': {'cpu': 'fused'}}
    """
    report: dict[str, dict[str, str]] = {}
    for op in sorted(_registry):
        report[op] = {}
        for device in device_types_here():
            try:
                report[op][device] = resolve(op, device)
            except RuntimeError as exc:  # a forced backend that cannot serve this device
                report[op][device] = f"error: {exc}"
    return report
