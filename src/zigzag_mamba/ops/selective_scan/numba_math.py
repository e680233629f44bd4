"""numba building blocks of the CPU selective scan: vectorisable float32 math, lane tiles,
and two LLVM intrinsics.

A kernel works on blocks of :data:`LANES` channels at once, so every inner loop runs over the
lanes with unit stride and a compile-time trip count. float32 uses a polynomial ``exp`` that
LLVM can vectorise (there is no vector math library to call); float64, used for gradient checks,
uses ``math``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

# Reassociation lets LLVM vectorise the sums over the lanes (for dB and dC). The exp polynomial
# is compiled separately without it, so its Cody-Waite range reduction stays exact. Functions
# that divide use error_model="numpy": the ZeroDivisionError branch of Python semantics would keep
# their loops from vectorising, and no divisor here can be zero.
FAST = {"contract", "reassoc", "nsz"}
_f32 = np.float32
# Channels per parallel job and width of every inner loop: a multiple of the SIMD width and a
# compile-time trip count, so LLVM unrolls the lane loops without remainders. 32 float32 lanes
# (four AVX2 vectors) share each step's loop overhead, scalar loads of B and C, and horizontal
# sums better than 16 (docs/kernels.md has the measurement); the chunk scratch still fits in L2.
LANES = 32
HALF_LANES = LANES // 2

_LOG2E = _f32(1.4426950408889634)
_LN2_HI = _f32(0.693145751953125)  # few mantissa bits, so k * _LN2_HI is exact
_LN2_LO = _f32(1.428606765330187e-06)
_EXP_LO = _f32(-87.33)  # exp(x) is subnormal in float32 below this
_EXP_HI = _f32(88.72)  # and overflows above this
ZERO, HALF, ONE, TWO = _f32(0.0), _f32(0.5), _f32(1.0), _f32(2.0)
_EXPONENT_BIAS, _MANTISSA_SCALE = _f32(127.0), _f32(2.0**23)
# Taylor coefficients 1/k!; |r| <= ln(2)/2 bounds the degree-6 remainder by 1.3e-7 relative.
_E2, _E3, _E4, _E5, _E6 = (_f32(1.0 / math.factorial(k)) for k in range(2, 7))
# atanh series 1/(2k+1): log1p(e) = 2 atanh(e / (2 + e)) with e / (2 + e) <= 1/3 for e in [0, 1].
_A3, _A5, _A7, _A9, _A11, _A13 = (_f32(1.0 / k) for k in range(3, 15, 2))


@intrinsic
def _int_bits_as_float32(typingctx, bits):
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, fastmath={"contract"})
def _exp32(x):
    # Clamping keeps the exponent arithmetic in range and costs nothing measurable: below the
    # clamp the result is 1.2e-38 instead of a subnormal (absolute error < 1.2e-38); above it,
    # float32 overflows anyway. Written as comparisons so that NaN passes through.
    xc = _EXP_LO if x < _EXP_LO else x
    xc = _EXP_HI if xc > _EXP_HI else xc
    k = np.floor(xc * _LOG2E + HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p = ONE + r * (ONE + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * _E6)))))
    return p * _int_bits_as_float32(np.int32((k + _EXPONENT_BIAS) * _MANTISSA_SCALE))


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _log1p32_unit(e):
    """log(1 + e) for e in [0, 1]."""
    s = e / (TWO + e)
    s2 = s * s
    series = _A9 + s2 * (_A11 + s2 * _A13)
    return TWO * s * (ONE + s2 * (_A3 + s2 * (_A5 + s2 * (_A7 + s2 * series))))


def exp(x):
    raise NotImplementedError  # only called from compiled code, resolved by the overload below


def log1p_unit(e):
    raise NotImplementedError


@overload(exp)
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


@overload(log1p_unit)
def _log1p_unit_impl(e):
    if e == types.float32:
        return lambda e: _log1p32_unit(e)
    return lambda e: math.log1p(e)


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM compile the calling function with the CPU's widest vector registers.

    On AVX-512 CPUs LLVM prefers 256-bit vectors unless a function says otherwise (process-wide,
    numba could only change that for every function it compiles). These two string attributes
    say it for the calling kernel alone (llvmlite's attribute set knows only keyword attributes,
    hence ``set.add``); targets without such registers ignore them. ``noinline`` keeps the body
    in a function that carries them: code inlined into a caller is compiled under the caller's
    attributes. (docs/kernels.md records what this saved on an AVX-512 Xeon.)
    """

    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')
        attributes.add("noinline")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def stack_tile(typingctx, rows, dtype):
    """An uninitialised C-contiguous (rows, LANES) array on the calling function's stack.

    LLVM knows that stack memory aliases no other array, so loops that store into such arrays
    vectorise without runtime overlap checks (too many of those make it give up and run the
    scalar loop). The memory lives until the calling function returns: call this only at the
    top level of a kernel, never in a loop or in a helper that returns the array.
    """
    item = dtype.dtype
    array_type = types.Array(item, 2, "C")

    def codegen(context, builder, signature, args):
        n_rows = context.cast(builder, args[0], signature.args[0], types.intp)
        lanes = context.get_constant(types.intp, LANES)
        ll_item = context.get_value_type(item)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(ll_item))
        array = context.make_array(array_type)(context, builder)
        populate_array(
            array,
            data=builder.alloca(ll_item, size=builder.mul(n_rows, lanes)),
            shape=[n_rows, lanes],
            strides=[builder.mul(lanes, itemsize), itemsize],
            itemsize=itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(rows, dtype), codegen


@njit(cache=True)
def block_bounds(n_chan, n_group, block):
    """(group, first channel, channel count) of the block-th block of LANES channels.

    Blocks never straddle a group, so one block reads one row of B and C; a group whose size is
    not a multiple of LANES ends in a partial block.
    """
    per_group = n_chan // n_group
    per_block = -(-per_group // LANES)
    g, k = block // per_block, block % per_block
    first = g * per_group + k * LANES
    return g, first, min(LANES, (g + 1) * per_group - first)


# The copies below take stack tiles; inlining them (in numba's IR) keeps the tiles' addresses
# from escaping into a call, which would cost LLVM its knowledge that they alias nothing.


@njit(cache=True, inline="always")
def load_tile(src, b, d0, width, c0, steps, tile):
    """tile[i, w] = src[b, d0 + w, c0 + i]; lanes beyond ``width`` are zeroed."""
    # Contiguous stores, strided loads: the order that compiles to plain scalar copies (the
    # other order is vectorised with gathers, which are slower than scalar code here).
    for i in range(steps):
        for w in range(LANES):
            tile[i, w] = src[b, d0 + w, c0 + i] if w < width else 0


@njit(cache=True, inline="always")
def store_tile(tile, b, d0, width, c0, steps, dst):
    # Contiguous stores, strided loads from the (L1-resident) tile: the other order compiles to
    # scatters, which are far slower.
    for w in range(width):
        for i in range(steps):
            dst[b, d0 + w, c0 + i] = tile[i, w]


@njit(cache=True, inline="always")
def load_lanes(vec, d0, width, lanes):
    """lanes[w] = vec[d0 + w], zero beyond ``width``."""
    for w in range(LANES):
        lanes[w] = vec[d0 + w] if w < width else 0


@njit(cache=True, inline="always")
def load_A(A, d0, width, a):
    """a[n, w] = A[d0 + w, n]; padding lanes get A = 0, so their state never moves off zero."""
    for n in range(A.shape[1]):
        for w in range(LANES):
            a[n, w] = A[d0 + w, n] if w < width else 0
