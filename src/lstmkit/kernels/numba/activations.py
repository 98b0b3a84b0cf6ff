"""sigmoid and tanh for the fused kernels: exact in float64, fast and vectorisable in float32.

Numba has no SIMD exp/tanh here (no SVML), so a loop calling math.tanh runs one
element at a time. For float32 we use a rational function instead: Lambert's
continued fraction for tanh, truncated at 12 levels, is the Pade approximant

    tanh(x) ~= x * P(x^2) / Q(x^2)      P degree 6, Q degree 6, all coefficients > 0

Its truncation error on [-9, 9] is 4e-8 (below float32 rounding of values near 1);
outside, tanh(x) rounds to +-1 in float32, so we clamp x to [-9, 9] first — which is
also why huge inputs (even +-inf) give +-1 and never overflow or NaN. With positive
coefficients Horner's rule has no cancellation; evaluated in float32 the result is
within 4e-7 (about 6 float32 ulps of 1) of the exact tanh. It is only adds,
multiplies, one divide and min/max (the result is clamped to [-1, 1] too, as
rounding could overshoot by an ulp), so LLVM vectorises the gate loop.

sigmoid(x) = (1 + tanh(x/2)) / 2 inherits that: within 2e-7 absolute.

float64 uses the exact functions (np.tanh, 1 / (1 + exp(-x))), so float64 results
agree with torch.nn.LSTM to ~1e-15 per step. exp(-x) overflowing to inf for x < -709
gives 1/(1+inf) = 0, the right limit (the kernels' fastmath flags keep inf semantics).
"""
import numpy as np
from numba import types
from numba.extending import overload

# Coefficients of P and Q (in powers of x^2), normalised so P[0] = Q[0] = 1.
# They are the exact rationals of the 12-level convergent of
# tanh x = x / (1 + x^2 / (3 + x^2 / (5 + ...))), rounded to float64.
_P = (1.0, 0.14666666666666667, 0.0052173913043478265, 6.625258799171843e-05,
      3.2286836253274086e-07, 5.179706350792634e-10, 1.264885555749117e-13)
_Q = (1.0, 0.48, 0.03188405797101449, 0.0006625258799171842,
      5.230467473030402e-06, 1.5193805295658393e-08, 1.1510458557316966e-11)
_CLAMP = 9.0  # |x| beyond this: float32 tanh(x) is +-1
# The same rational for simd.py's vector blocks (public names for another module).
TANH_NUMERATOR, TANH_DENOMINATOR, TANH_CLAMP = _P, _Q, _CLAMP


def pade_coefficients(levels: int = 12):
    """Recompute _P/_Q from the continued fraction (used by the tests)."""
    from fractions import Fraction

    num, den = [Fraction(2 * levels + 1)], [Fraction(1)]  # t_K = 2K+1
    for k in range(levels - 1, -1, -1):  # t_k = (2k+1) + z / t_{k+1}
        new = [Fraction(0)] * max(len(num), len(den) + 1)
        for i, c in enumerate(num):
            new[i] += (2 * k + 1) * c
        for i, c in enumerate(den):
            new[i + 1] += c
        num, den = new, num
    p, q = den, num  # tanh = x * den / num
    return tuple(float(c / q[0]) for c in p), tuple(float(c / q[0]) for c in q)


P0, P1, P2, P3, P4, P5, P6 = (np.float32(c) for c in _P)
Q0, Q1, Q2, Q3, Q4, Q5, Q6 = (np.float32(c) for c in _Q)
CLAMP32 = np.float32(_CLAMP)
HALF32 = np.float32(0.5)
ONE32 = np.float32(1.0)


def tanh(x):
    """Scalar tanh used inside njit kernels (dispatches on dtype, see module doc)."""
    return np.tanh(x)


def sigmoid(x):
    """Scalar logistic sigmoid used inside njit kernels."""
    return 1.0 / (1.0 + np.exp(-x))


# Not inline="always": inlining at Numba's IR level recompiled them at every call site
# (seconds of the cold start); LLVM inlines the compiled function into the loops anyway.
@overload(tanh)
def _tanh_impl(x):
    if x == types.float32:
        def impl(x):
            x = min(max(x, -CLAMP32), CLAMP32)
            z = x * x
            p = P0 + z * (P1 + z * (P2 + z * (P3 + z * (P4 + z * (P5 + z * P6)))))
            q = Q0 + z * (Q1 + z * (Q2 + z * (Q3 + z * (Q4 + z * (Q5 + z * Q6)))))
            r = x * p / q
            return min(max(r, -ONE32), ONE32)  # rounding can overshoot 1 by an ulp
        return impl
    return lambda x: np.tanh(x)


@overload(sigmoid)
def _sigmoid_impl(x):
    if x == types.float32:
        def impl(x):
            return HALF32 + HALF32 * tanh(HALF32 * x)
        return impl
    return lambda x: 1.0 / (1.0 + np.exp(-x))
