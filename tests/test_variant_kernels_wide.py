"""The variant kernels at hidden sizes where float32 rows run as vector blocks plus a scalar
tail (kernels/numba/simd.py, LANES = 8 or 16 units): the fused engine against the reference
engine's float64 results, every variant part on and off, padded and packed rows."""
import itertools

import pytest
import torch

from harness import TOL
from test_variants import fused_and_spec_errors

PARTS = list(itertools.product([False, True], repeat=4))  # peephole, zoneout c, zoneout h, recurrent dropout


@pytest.mark.parametrize("H", [16, 17, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_numba_variant_kernel_wide_rows_match_reference(H, dtype, layer_norm):
    for k, (peep, zc, zh, rm) in enumerate(PARTS):
        for lengths, reverse in (([4, 4, 4], False), ([5, 3, 1, 1], True)):
            spec, fused = fused_and_spec_errors(k, 5, H, lengths, dtype, reverse=reverse, proj=k % 2 == 1,
                                                ln_=layer_norm, peep=peep, zc=zc, zh=zh, rm=rm, train=k % 3 == 0)
            # Rows this wide sum enough terms that the spec's own float32 error nears 1e-5: the
            # fused engine may not be more than a few times less accurate than the spec.
            assert fused <= max(TOL[dtype], 4 * spec), (peep, zc, zh, rm, lengths, spec, fused)
