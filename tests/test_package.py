import subprocess
import sys

import pytest

import zigzag_mamba

# Run in a fresh interpreter: this process has already imported whatever other tests needed.
IMPORT_HYGIENE = """
import sys
import torch

def forbidden(*args, **kwargs):
    raise AssertionError("importing zigzag_mamba touched the CUDA API")

for name in ("is_available", "device_count", "init", "current_device", "get_device_name"):
    setattr(torch.cuda, name, forbidden)

import zigzag_mamba
import zigzag_mamba.ops
import zigzag_mamba.orders
{extra}
loaded = sorted(
    m for m in sys.modules
    if m.split(".")[0]
    in ("triton", "mamba_ssm", "causal_conv1d", "numba", "matplotlib", "transformers", "timm",
        "diffusers")
)
assert not loaded, loaded
print("ok")
"""


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "import zigzag_mamba.cli; zigzag_mamba.cli.build_parser()",
        "import zigzag_mamba.integrations",
    ],
)
def test_import_loads_no_optional_dependency_and_no_cuda(extra):
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_HYGIENE.format(extra=extra)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_version_and_typed_marker():
    from importlib.resources import files

    assert zigzag_mamba.__version__.count(".") == 2
    assert files("zigzag_mamba").joinpath("py.typed").is_file()


def test_public_names_exist():
    for name in ("ZigzagScan", "backends", "use_backend", "layer_orders", "list_patterns"):
        assert hasattr(zigzag_mamba, name)
    from zigzag_mamba.ops import permute_tokens  # noqa: F401
    from zigzag_mamba.orders import layer_orders, zigzag_orders  # noqa: F401
