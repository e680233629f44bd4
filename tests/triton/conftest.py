import os
import sys

import pytest

if os.environ.get("TRITON_INTERPRET") != "1" and not os.environ.get("ZIGZAG_MAMBA_CUDA_TESTS"):
    pytest.exit("run as: TRITON_INTERPRET=1 python -m pytest tests/triton", returncode=4)

pytest.importorskip("triton")

# accuracy.py, the accuracy rule these tests share.
sys.path.insert(0, os.path.dirname(__file__))
