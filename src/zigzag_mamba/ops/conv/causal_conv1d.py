"""The ``causal_conv1d`` backend: the causal-conv1d package's CUDA kernel, when it imports.

Importing this module imports the package; the registry's probe does that lazily, so a missing
or CPU-only install only makes this backend unavailable. The kernel is differentiable by
autograd and takes 2 to 4 taps.
"""

from __future__ import annotations

from causal_conv1d import causal_conv1d_fn as causal_conv1d

__all__ = ["causal_conv1d"]
