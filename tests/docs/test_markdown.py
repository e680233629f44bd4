"""Every code block of the README and docs/ runs as written.

Each ```python block runs on its own, in a fresh namespace and an empty working folder, so that a
reader can paste any one of them; blocks written as an interactive session (``>>>`` prompts)
run as doctests, so their printed results are checked too. Each ```bash block runs in bash in
an empty folder. A block that cannot run here (it installs packages, needs a GPU, or takes
minutes) is preceded by ``<!-- skip: reason -->``; the reason shows in the test report. A block
that needs an optional package (an extra) is preceded by ``<!-- requires: package ... -->`` and
skipped, with that reason, where the package is not installed.
"""

from __future__ import annotations

import doctest
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(
    r"(?:<!-- skip: (?P<skip>.+?) -->\n)?(?:<!-- requires: (?P<requires>.+?) -->\n)?"
    r"```(?P<language>python|bash)\n(?P<code>.*?)```",
    re.S,
)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    code: str
    skip: str | None
    requires: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in FILES:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            code, skip = match.group("code"), match.group("skip")
            requires = tuple((match.group("requires") or "").split())
            found.append(Block(path, line, match.group("language"), code, skip, requires))
    return found


BLOCKS = blocks()


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 25, [b.name for b in BLOCKS]


# Blocks that need timm run with the timm tests, in their own environment (-m timm).
TIMM = [pytest.mark.timm]


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.name, marks=TIMM if "timm" in b.requires else ()) for b in BLOCKS],
)
def test_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    for package in block.requires:
        pytest.importorskip(package, reason=f"needs {package} (an extra), not installed")
    monkeypatch.chdir(tmp_path)
    if block.language == "bash":
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, f"{block.name}:\n{done.stdout}\n{done.stderr}"
    elif block.code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(block.code, {}, block.name, str(block.path), 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.failures == 0, f"{block.name}: see the doctest report above"
    else:
        exec(compile(block.code, block.name, "exec"), {"__name__": "__docs__"})
