"""ZigMa blocks, backbones and ops against attention: time and peak memory versus token count.

The same code as ``zigma bench`` (see :mod:`zigzag_mamba.bench`); every option is the same::

    python benchmarks/bench_blocks.py --quick        # a few minutes on 2 CPU cores
    python benchmarks/bench_blocks.py                # the full sweep for this device

Results: ``benchmarks/results/<machine>/`` (CSV, JSON, summary.md, PNG plots).
"""

from zigzag_mamba.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
