"""Every example in the package's docstrings runs and prints what it says (doctest).

Examples run in an empty working folder with ``torch`` and ``zigzag_mamba`` in scope besides the
module's own names. An example that cannot run here says why with ``# doctest: +SKIP`` and a
comment; the modules that import optional GPU packages (Triton kernels, mamba-ssm,
causal-conv1d) are not imported here: their docstrings hold no examples.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import zigzag_mamba

# Importing these needs a GPU package, or defines Triton kernels in this process.
_NOT_IMPORTED = (
    ".triton",
    ".triton_kernels",
    ".mamba_ssm",
    ".causal_conv1d",
    "zigzag_mamba.__main__",
)
# Modules that import an optional package (an extra): examined only where it is installed.
_NEEDS = {"zigzag_mamba.integrations.diffusers": "diffusers"}


def _modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(zigzag_mamba.__path__, "zigzag_mamba.")
        if not info.name.endswith(_NOT_IMPORTED)
        and (info.name not in _NEEDS or importlib.util.find_spec(_NEEDS[info.name]) is not None)
    ]
    return ["zigzag_mamba", *names]


def _examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        globs = {"torch": torch, "zigzag_mamba": zigzag_mamba, **vars(module)}
        tests += [t for t in finder.find(module, name, globs=globs) if t.examples]
    return tests


EXAMPLES = _examples()


def test_the_package_has_docstring_examples():
    assert sum(len(t.examples) for t in EXAMPLES) >= 80


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example(test: doctest.DocTest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, clear_globs=False)
    assert runner.failures == 0, f"{test.name}: see the doctest report above"
