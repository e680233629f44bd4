"""Which implementation (backend) runs each op on each device, and how to force one.

Every op registers its backends here, in order of preference, each with the module that holds
its implementation. A backend is *available* on a device type when its probe passes; the
default probe imports the module, so an optional package that fails to import (mamba-ssm
without a CUDA build, numba on an unsupported Python) simply makes that backend unavailable.
Probes run lazily, once per device type, at first use; never at import.

The choice is ``"auto"`` (the first available backend for the tensor's device) unless it is
forced: for the whole process by an environment variable (``ZIGZAG_MAMBA_SELECTIVE_SCAN``,
``ZIGZAG_MAMBA_PERMUTE_TOKENS``, ``ZIGZAG_MAMBA_CROSS_PERMUTE``, ``ZIGZAG_MAMBA_MIXER_IO``,
``ZIGZAG_MAMBA_CAUSAL_CONV1D``), or
in the current thread by :class:`use_backend`. A backend that does not take the inputs' dtype
(the Triton and mamba-ssm kernels compute in fp32 and take no float64) hands the call to the
op's portable ``"torch"`` backend, which runs everywhere.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType, TracebackType

import torch

BACKEND_NAMES = ("auto", "numba", "torch", "reference", "mamba_ssm", "triton", "causal_conv1d")
# Every op has a backend of this name: plain PyTorch, on every device.
PORTABLE = "torch"

Probe = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        name: its name in :func:`use_backend` and the environment variables.
        module: the module that implements it, imported at first use.
        device_types: the devices "auto" may pick it for, in registration order.
        probe: ``probe(device_type)`` returns None when it can run there, else a one-line reason.
        dtypes: the input dtypes it takes (None: all); others go to the portable backend.
        forced_device_types: further devices where it runs only when forced (the Triton kernels
            on CPU tensors under ``TRITON_INTERPRET=1``, which is how tests exercise them).
    """

    name: str
    module: str
    device_types: tuple[str, ...]
    probe: Probe
    dtypes: tuple[torch.dtype, ...] | None = None
    forced_device_types: tuple[str, ...] = ()

    def serves(self, device_type: str, *, forced: bool) -> bool:
        return device_type in self.device_types or (
            forced and device_type in self.forced_device_types
        )


_registry: dict[str, list[Backend]] = {}
# op -> forced backend name; a fresh mapping is set on every change, never mutated.
_forced: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "zigzag_mamba_forced_backends", default=MappingProxyType({})
)


def env_var(op: str) -> str:
    return f"ZIGZAG_MAMBA_{op.upper()}"


def import_probe(module: str) -> Probe:
    """The default probe: the backend can run wherever its module imports."""

    def probe(device_type: str) -> str | None:
        importlib.import_module(module)
        return None

    return probe


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its interpreter, i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_probe(module: str) -> Probe:
    """Triton kernels run on a CUDA device with a working Triton driver, or on the CPU under
    the Triton interpreter; ``import triton`` alone proves neither."""

    def probe(device_type: str) -> str | None:
        if device_type == "cpu":
            if not triton_interpreting():
                return "Triton takes CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
            importlib.import_module(module)
            return None
        if not torch.cuda.is_available():
            return "no CUDA device"
        try:
            import triton
        except ImportError as exc:
            return (
                f"triton is not installed ({exc}); install the triton extra "
                "(pip install -e '.[triton]' in a clone)"
            )
        try:
            triton.runtime.driver.active.get_current_target()
        except Exception as exc:  # no driver, or a Triton built for another platform
            return f"triton has no usable GPU driver: {type(exc).__name__}: {exc}"
        importlib.import_module(module)
        return None

    return probe


def register_backend(
    op: str,
    name: str,
    module: str,
    device_types: tuple[str, ...],
    *,
    probe: Probe | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    forced_device_types: tuple[str, ...] = (),
) -> None:
    """Add a backend of ``op``; earlier registrations are preferred by ``"auto"``."""
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {name!r}")
    backends = _registry.setdefault(op, [])
    if any(b.name == name for b in backends):
        raise ValueError(f"backend {name!r} is already registered for {op!r}")
    probe = probe or import_probe(module)
    backends.append(Backend(name, module, device_types, probe, dtypes, forced_device_types))


def register_triton_backend(
    op: str, module: str, dtypes: tuple[torch.dtype, ...] | None = None
) -> None:
    """Register ``module``'s Triton kernels as backend "triton" of ``op``: first choice on CUDA
    where Triton can run, and on CPU tensors when forced under the Triton interpreter."""
    register_backend(
        op,
        "triton",
        module,
        ("cuda",),
        probe=triton_probe(module),
        dtypes=dtypes,
        forced_device_types=("cpu",),
    )


@functools.cache
def unavailable_reason(op: str, name: str, device_type: str) -> str | None:
    """Why backend ``name`` of ``op`` cannot run on ``device_type``, or None (probed once)."""
    try:
        return _find(op, name).probe(device_type)
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
    """The backend asked for ``op``: forced by :func:`use_backend`, else the env var, else auto.

    A misspelt environment variable raises here, when the op runs, rather than silently
    running the default.
    """
    forced = _forced.get()
    if op in forced:
        return forced[op]
    choice = os.environ.get(env_var(op), "auto").strip() or "auto"
    if choice == "auto":
        return choice
    try:
        _find(op, choice)
    except ValueError as exc:
        raise ValueError(f"{env_var(op)}={choice!r}: {exc}") from None
    return choice


def resolve(op: str, device_type: str) -> str:
    """The backend that runs ``op`` for tensors on ``device_type`` ("cpu", "cuda", ...)."""
    choice = requested(op)
    if choice != "auto":
        backend = _find(op, choice)
        if not backend.serves(device_type, forced=True):
            raise RuntimeError(
                f"{op} backend {choice!r} runs on {backend.device_types}, not on {device_type!r} "
                f"tensors; use 'auto' or one of {_names_for(op, device_type)}"
            )
        reason = unavailable_reason(op, choice, device_type)
        if reason is not None:
            raise RuntimeError(f"{op} backend {choice!r} is not available here: {reason}")
        return choice
    for backend in _registry[op]:
        serves = backend.serves(device_type, forced=False)
        if serves and unavailable_reason(op, backend.name, device_type) is None:
            return backend.name
    raise RuntimeError(f"no available {op} backend for {device_type!r} tensors")


def implementation(op: str, device_type: str, *tensors: torch.Tensor | None) -> str:
    """The backend that runs this call of ``op``: the resolved one, or the portable one when
    the resolved backend does not take the dtype of one of ``tensors``."""
    name = resolve(op, device_type)
    dtypes = _find(op, name).dtypes
    if dtypes is not None and any(t is not None and t.dtype not in dtypes for t in tensors):
        return PORTABLE
    return name


@functools.cache
def backend_module(op: str, name: str) -> ModuleType:
    """The module implementing backend ``name`` of ``op`` (imported at first use)."""
    return importlib.import_module(_find(op, name).module)


def _names_for(op: str, device_type: str) -> list[str]:
    return [b.name for b in _registry[op] if b.serves(device_type, forced=True)]


class use_backend:
    """Force the backend of one or more ops, in the current thread.

    As a ``with`` block, the choice holds inside it. As a plain call, it holds until it is
    changed again (``use_backend(selective_scan="auto")``) or :meth:`reset`. Other threads keep
    their own choice (the environment variables apply to all of them).

    Example::

        >>> x = torch.randn(2, 8, 16)
        >>> with zigzag_mamba.use_backend(selective_scan="torch"):
        ...     zigzag_mamba.backends()["selective_scan"]["cpu"]
        'torch'

    Forcing a backend that cannot run here raises a ``RuntimeError`` at once.
    """

    def __init__(self, **choices: str) -> None:
        current = {}
        for op, name in choices.items():
            if op not in _registry:
                raise TypeError(f"use_backend() got unknown op {op!r}; ops: {sorted(_registry)}")
            if not isinstance(name, str):
                raise TypeError(f"use_backend({op}=...) takes a backend name, got {name!r}")
            if name != "auto":
                backend = _find(op, name)
                reasons = {
                    d: unavailable_reason(op, name, d)
                    for d in (*backend.device_types, *backend.forced_device_types)
                }
                if all(r is not None for r in reasons.values()):
                    reason = "; ".join(f"{d}: {r}" for d, r in reasons.items())
                    raise RuntimeError(f"{op} backend {name!r} is not available here: {reason}")
            current[op] = name
        forced = {**_forced.get(), **current}
        forced = {op: name for op, name in forced.items() if name != "auto"}
        self._token = _forced.set(MappingProxyType(forced))

    def reset(self) -> None:
        """Restore the choices in force before this call."""
        _forced.reset(self._token)

    def __enter__(self) -> use_backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.reset()


def device_types_here() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backends() -> dict[str, dict[str, str]]:
    """What each op resolves to on each device type of this machine.

    A choice that cannot be honoured (a misspelt environment variable, a forced backend that
    cannot run here) is reported as ``"error: ..."``; only running the op raises.

    Example::

        >>> zigzag_mamba.backends()["permute_tokens"]
        {'cpu': 'torch'}
    """
    report: dict[str, dict[str, str]] = {}
    for op in sorted(_registry):
        report[op] = {}
        for device in device_types_here():
            try:
                report[op][device] = resolve(op, device)
            except (RuntimeError, ValueError) as exc:
                report[op][device] = f"error: {exc}"
    return report
