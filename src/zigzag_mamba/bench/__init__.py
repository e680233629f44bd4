"""Benchmarks of ZigMa blocks, backbones and ops against attention: ``zigma bench``.

Layout: :mod:`~zigzag_mamba.bench.timing` (warm-up, repeats, synchronisation, peak memory,
what machine this is), :mod:`~zigzag_mamba.bench.contenders` (the blocks and backbones compared,
including a DiT-style attention block built here), :mod:`~zigzag_mamba.bench.ops` (op-level
workloads), :mod:`~zigzag_mamba.bench.sweep` (the sweeps over token counts),
:mod:`~zigzag_mamba.bench.report` (CSV, JSON, Markdown and plots) and
:mod:`~zigzag_mamba.bench.cli` (the command).

``import zigzag_mamba`` does not import this package; plotting needs matplotlib
(the bench extra: ``pip install -e '.[bench]'`` in a clone).
"""
