"""Random 0/1 masks for the variants' training noise (zoneout, recurrent dropout, weight drop).

    bernoulli_fill(out, seed, threshold)   out[k] = 1 with probability threshold / 2^32, else 0

Why not torch.rand(shape) < p: torch's CPU generator (a Mersenne twister, one value at a time)
takes about 4 ns per element, and zoneout draws two masks of every packed row and unit per call:
at T=100, N=16, H=128 that was 2.7 ms of a 14 ms training step (BENCHMARKS.md, seventh session).
Here each element is a counter-based hash, splitmix64's finalizer of seed + k * golden ratio,
so the loop has no carried state and vectorises (about 0.5 ns per element). The caller draws the
seed from torch's generator, so torch.manual_seed still fixes the masks. The upper 32 bits are
compared with the threshold: probabilities are exact to 2^-32 (torch.rand's float32 to 2^-24).
"""
import numpy as np
from numba import njit

from .rows import KW

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@njit(**KW)
def bernoulli_fill(out, seed, threshold):
    """out (1-D float array) = 1 where hash(seed, k) < threshold (0 <= threshold <= 2^32), else 0."""
    s = np.uint64(seed)
    thr = np.uint64(threshold)
    golden, mix1, mix2 = np.uint64(_GOLDEN), np.uint64(_MIX1), np.uint64(_MIX2)
    for k in range(out.shape[0]):
        z = s + np.uint64(k) * golden
        z = (z ^ (z >> np.uint64(30))) * mix1
        z = (z ^ (z >> np.uint64(27))) * mix2
        z = z ^ (z >> np.uint64(31))
        out[k] = 1.0 if (z >> np.uint64(32)) < thr else 0.0


def bernoulli(shape, p: float, dtype, seed: int) -> np.ndarray:
    """An array of `shape` and `dtype`: 1 with probability p, else 0 (seed: any int below 2^64)."""
    out = np.empty(int(np.prod(shape)), dtype)
    threshold = min(max(round(p * 2.0**32), 0), 2**32)
    bernoulli_fill(out, np.uint64(seed % 2**64), np.uint64(threshold))
    return out.reshape(shape)
