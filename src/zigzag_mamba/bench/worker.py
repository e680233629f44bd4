"""Measure one benchmark point in this fresh process: a JSON spec on stdin, JSON rows on stdout.

Used by :func:`zigzag_mamba.bench.sweep.run_isolated`; the rows are the last line printed.
"""

from __future__ import annotations

import json
import sys

from zigzag_mamba.bench.sweep import run_point


def main() -> None:
    rows = run_point(json.loads(sys.stdin.read()))
    sys.stdout.write("\n" + json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
