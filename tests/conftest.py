import os
import sys

# Triton kernels run in the interpreter only if TRITON_INTERPRET=1 is set before they are
# defined, i.e. before the process imports them; those tests run in their own pytest process:
#   TRITON_INTERPRET=1 python -m pytest tests/triton
# On a CUDA machine, ZIGZAG_MAMBA_CUDA_TESTS=1 runs them on the GPU instead.
_TRITON_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(
    "ZIGZAG_MAMBA_CUDA_TESTS"
)
collect_ignore = [] if _TRITON_PROCESS else ["triton"]

# tests/helpers.py, for the tests of every folder.
sys.path.insert(0, os.path.dirname(__file__))
