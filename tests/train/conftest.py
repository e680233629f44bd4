import sys
from pathlib import Path

import pytest

# The helpers module is also imported by worker scripts that run outside pytest.
sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import example_target


@pytest.fixture
def gaussian():
    """``gaussian(path)`` builds the example Gaussian target for an interpolant path."""
    return example_target
