"""numba-compiled fused CPU kernels.

Importing this package imports numba and compiles nothing; kernels compile (or load from numba's
on-disk cache) at their first call. Callers import it lazily, so a broken numba install only
disables these kernels.
"""
