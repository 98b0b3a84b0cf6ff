"""The float32 gate passes as explicit vector code (LLVM IR), V units at a time.

    gate_block(q, b, a, c, h, H, j)      units j : j+V of kernels/lstm.py gate_row
    gate_backward_block(a, cell, cprev, dh, dc, dg, hpre, want_hpre, H, j)
                                          units j : j+V of lstm.gate_backward_row
    gate_block2, gate_backward_block2    the same for units j : j+2V, two blocks interleaved
    block_units(p, H)                    how many of the H units the blocks cover (a multiple of V)

Both blocks take row pointers (rows.py), not arrays: a step calls them for each of its rows.

Why not Numba's loop vectoriser: on AVX-512 machines LLVM prefers 256-bit vectors for
loops it vectorises itself (the CPUs' "prefer-256-bit" tuning), and the gate pass is
bound by its five divisions per unit (the rational tanh of activations.py, one per gate
and one for tanh(c)). Written as <16 x float> code it runs on full 512-bit registers, and
each division becomes a reciprocal estimate (14 bits, rcp14) refined by one Newton step
(about 28 bits, below float32 rounding) times the numerator: fused multiply-adds instead
of the divider. Without AVX-512 the block is 8 lanes (AVX2) with exact divisions.

Same math as activations.py, op for op (clamp to [-9, 9], Horner in x^2, clamp to
[-1, 1]; sigmoid(x) = 1/2 + tanh(x/2)/2); the comparisons are ordered, so NaN flows
through as NaN. float64 is not vectorised here: block_units returns 0 and the exact
scalar loop (np.tanh, exp) does every unit. The variant kernel's blocks (variant_gate_block,
out_tanh_block, variant_out_backward_block, variant_gate_backward_block) are written the same way.

Numba's cache keys a compiled function by its own file: after editing this file, touch
kernels/numba/lstm.py (its caller) or its cached code keeps the old blocks.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

from .activations import TANH_CLAMP, TANH_DENOMINATOR, TANH_NUMERATOR


def _has_avx512() -> bool:
    """Whether the CPU Numba compiles for has AVX-512F (NUMBA_CPU_FEATURES, else the host)."""
    if config.CPU_FEATURES:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    import llvmlite.binding as ll

    return bool(ll.get_host_cpu_features().get("avx512f", False))


AVX512 = _has_avx512()
LANES = 16 if AVX512 else 8  # float32 units per block


def _f32_pointers(*ptrs) -> bool:
    return all(isinstance(t, types.CPointer) and t.dtype == types.float32 for t in ptrs)


@intrinsic
def block_units(typingctx, p, H):
    """How many of H units the pointer blocks below cover for rows of p's dtype: H rounded down
    to a multiple of LANES for float32, 0 for float64 (the exact scalar code does those)."""
    ok = _f32_pointers(p)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        n = builder.sext(args[1], i64) if args[1].type.width < 64 else args[1]
        if not ok:
            return ir.Constant(i64, 0)
        return builder.mul(builder.sdiv(n, ir.Constant(i64, LANES)), ir.Constant(i64, LANES))

    return types.int64(p, H), codegen


class _VectorMath:
    """IR helpers on <blocks * LANES x float> values: with blocks > 1, LLVM splits each
    operation into one per register, so independent blocks' instructions interleave (the
    gate pass is a long chain of dependent operations per block: two at once keep the FMA
    units busier, BENCHMARKS.md sixth session)."""

    def __init__(self, builder, blocks: int = 1):
        self.b = builder
        self.ft = ir.FloatType()
        self.width = LANES * blocks
        self.vt = ir.VectorType(self.ft, self.width)
        mod = builder.module
        self.fma = cgutils.get_or_insert_function(mod, ir.FunctionType(self.vt, [self.vt] * 3),
                                                  f"llvm.fmuladd.v{self.width}f32")
        if AVX512:
            vt16 = ir.VectorType(self.ft, LANES)
            sig = ir.FunctionType(vt16, [vt16, vt16, ir.IntType(16)])
            self.rcp14 = cgutils.get_or_insert_function(mod, sig, "llvm.x86.avx512.rcp14.ps.512")

    def const(self, v):
        return ir.Constant(self.vt, [ir.Constant(self.ft, float(v))] * self.width)

    def _reciprocal_estimate(self, den):
        """rcp14 of each LANES-wide part of den, put back together."""
        b, i32 = self.b, ir.IntType(32)
        zero16 = ir.Constant(ir.VectorType(self.ft, LANES), [ir.Constant(self.ft, 0.0)] * LANES)
        mask = ir.Constant(ir.IntType(16), -1)
        if self.width == LANES:
            return b.call(self.rcp14, [den, zero16, mask])
        parts = []
        for p in range(0, self.width, LANES):
            part = b.shuffle_vector(den, den, ir.Constant(ir.VectorType(i32, LANES), list(range(p, p + LANES))))
            parts.append(b.call(self.rcp14, [part, zero16, mask]))
        while len(parts) > 1:  # concatenate pairwise
            n = 2 * parts[0].type.count
            parts = [b.shuffle_vector(parts[k], parts[k + 1], ir.Constant(ir.VectorType(i32, n), list(range(n))))
                     for k in range(0, len(parts), 2)]
        return parts[0]

    def clamp(self, x, lim):
        b, lo, hi = self.b, self.const(-lim), self.const(lim)
        x = b.select(b.fcmp_ordered("<", x, lo), lo, x)
        return b.select(b.fcmp_ordered(">", x, hi), hi, x)

    def divide(self, num, den):
        b = self.b
        if not AVX512:
            return b.fdiv(num, den)
        r = self._reciprocal_estimate(den)
        e = b.call(self.fma, [b.fneg(den), r, self.const(1.0)])  # 1 - den * r
        r = b.call(self.fma, [r, e, r])  # r + r * e: one Newton step
        return b.fmul(num, r)

    def horner(self, coeffs, z):
        acc = self.const(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            acc = self.b.call(self.fma, [z, acc, self.const(c)])
        return acc

    def tanh(self, x):
        b = self.b
        x = self.clamp(x, TANH_CLAMP)
        z = b.fmul(x, x)
        r = self.divide(b.fmul(x, self.horner(TANH_NUMERATOR, z)), self.horner(TANH_DENOMINATOR, z))
        return self.clamp(r, 1.0)

    def sigmoid(self, x):
        half = self.const(0.5)
        return self.b.call(self.fma, [half, self.tanh(self.b.fmul(half, x)), half])


def _pointer_codegen(body, blocks):
    """Codegen of a block intrinsic whose arguments are float32 row pointers (and flags), then
    H and j: body(builder, m, load, store, offset, args), offset(g) = g*H + j: gate g's units
    j : j+LANES in a row of 4H (offset(0) = j in a row of H)."""

    def codegen(context, builder, signature, args):
        if not _f32_pointers(*(t for t in signature.args if isinstance(t, types.CPointer))):
            return context.get_dummy_value()  # float64: never called (block_units is 0)
        m = _VectorMath(builder, blocks)
        i64 = ir.IntType(64)
        H, j0 = (builder.sext(v, i64) if v.type.width < 64 else v for v in args[-2:])

        def vec(p, offset):
            return builder.bitcast(builder.gep(p, [offset]), m.vt.as_pointer())

        def load(p, offset):
            return builder.load(vec(p, offset), align=4)

        def store(v, p, offset):
            builder.store(v, vec(p, offset), align=4)

        def offset(g):
            return builder.add(builder.mul(H, ir.Constant(i64, g)), j0)

        body(builder, m, load, store, offset, args)
        return context.get_dummy_value()

    return codegen


def _gate_body(builder, m, load, store, offset, args):
    """gate_block: units j : j+width of lstm.gate_row on float32 row pointers (q, bias, a rows
    of 4H; c, h of H): a[gH + j..] = activation of gate g, c[j..] = f * c + i * g,
    h[j..] = o * tanh(c)."""
    qa, ba, aa, ca, ha = args[:5]
    pre = [builder.fadd(load(qa, offset(g)), load(ba, offset(g))) for g in range(4)]
    ig, fg, gg, og = m.sigmoid(pre[0]), m.sigmoid(pre[1]), m.tanh(pre[2]), m.sigmoid(pre[3])
    for g, v in enumerate((ig, fg, gg, og)):
        store(v, aa, offset(g))
    j = offset(0)
    cv = builder.call(m.fma, [fg, load(ca, j), builder.fmul(ig, gg)])
    store(cv, ca, j)
    store(builder.fmul(og, m.tanh(cv)), ha, j)


def _gate_backward_body(builder, m, load, store, offset, args):
    """gate_backward_block: units j : j+width of lstm.gate_backward_row on float32 row pointers
    (a, dg rows of 4H; the others of H), the same formulas: dc_t = dc + dh o (1 - tanh(c_t)^2),
    then the four gate gradients and dc_{t-1} = dc_t f; hpre[j..] = o * tanh(c_t) when want_hpre."""
    aa, cella, cpa, dha, dca, dga, hprea, want = args[:8]
    j = offset(0)
    ig, fg, gg, og = (load(aa, offset(g)) for g in range(4))
    tc = m.tanh(load(cella, j))
    dhv = load(dha, j)
    fmul, fsub = builder.fmul, builder.fsub
    dct = builder.call(m.fma, [dhv, fsub(og, fmul(fmul(og, tc), tc)), load(dca, j)])
    store(fmul(fmul(dct, gg), fsub(ig, fmul(ig, ig))), dga, offset(0))
    store(fmul(fmul(dct, load(cpa, j)), fsub(fg, fmul(fg, fg))), dga, offset(1))
    store(fmul(dct, fsub(ig, fmul(fmul(ig, gg), gg))), dga, offset(2))
    store(fmul(fmul(dhv, tc), fsub(og, fmul(og, og))), dga, offset(3))
    store(fmul(dct, fg), dca, j)
    with builder.if_then(builder.icmp_unsigned("!=", want, ir.Constant(want.type, 0))):
        store(fmul(og, tc), hprea, j)


def _make_gate_block(blocks: int):
    @intrinsic
    def gate_block(typingctx, q, bias, a, c, h, H, j):
        return types.void(q, bias, a, c, h, H, j), _pointer_codegen(_gate_body, blocks)

    return gate_block


def _make_gate_backward_block(blocks: int):
    @intrinsic
    def gate_backward_block(typingctx, a, cell, cprev, dh, dc, dg, hpre, want_hpre, H, j):
        sig = types.void(a, cell, cprev, dh, dc, dg, hpre, want_hpre, H, j)
        return sig, _pointer_codegen(_gate_backward_body, blocks)

    return gate_backward_block


# Units j : j + LANES (one block), and j : j + 2 LANES (two at once); only valid below block_units.
gate_block, gate_block2 = _make_gate_block(1), _make_gate_block(2)
gate_backward_block, gate_backward_block2 = _make_gate_backward_block(1), _make_gate_backward_block(2)


# ---- the variant kernel's blocks (kernels/numba/variants.py), on row pointers as above ---------
def _variant_gate_body(builder, m, load, store, offset, args):
    """variant_gate_block: with x_g = a[gH + j..] + q[gH + j..] + bias[gH + j..] (a, q, bias rows
    of 4H; p_*, c, cn rows of H; peepholes zero when absent): i = sigmoid(x_i + p_i c),
    f = sigmoid(x_f + p_f c), g = tanh(x_g), c~ = f c + i g, o = sigmoid(x_o + p_o c~); a's gate
    rows become i, f, g, o and cn[j..] = c~ (c itself is not written: zoneout decides what is
    carried)."""
    aa, qa, ba, pia, pfa, poa, ca, cna = args[:8]
    fadd, fma = builder.fadd, (lambda x, y, z: builder.call(m.fma, [x, y, z]))
    pre = [fadd(fadd(load(aa, offset(g)), load(qa, offset(g))), load(ba, offset(g))) for g in range(4)]
    j = offset(0)
    cp = load(ca, j)
    ig = m.sigmoid(fma(load(pia, j), cp, pre[0]))
    fg = m.sigmoid(fma(load(pfa, j), cp, pre[1]))
    gg = m.tanh(pre[2])
    cv = fma(fg, cp, builder.fmul(ig, gg))
    og = m.sigmoid(fma(load(poa, j), cv, pre[3]))
    for g, v in enumerate((ig, fg, gg, og)):
        store(v, aa, offset(g))
    store(cv, cna, j)


def _out_tanh_body(builder, m, load, store, offset, args):
    """out_tanh_block: out[j..] = o * tanh(v[j..]), o = a[3H + j..] (a a row of 4H; v, out of H)."""
    aa, va, outa = args[:3]
    j = offset(0)
    store(builder.fmul(load(aa, offset(3)), m.tanh(load(va, j))), outa, j)


def _out_backward_body(builder, m, load, store, offset, args):
    """variant_out_backward_block, through h~ = o * tanh(v) (a, dg rows of 4H; the others of H):
    dv[j..] = dhp o (1 - tanh(v)^2), dg[3H + j..] = dhp tanh(v) o (1 - o), and
    hpre[j..] = o tanh(v) when want_hpre (the projection's input, for dW_hr)."""
    aa, va, dhpa, dga, dva, hprea, want = args[:7]
    j = offset(0)
    og = load(aa, offset(3))
    tc = m.tanh(load(va, j))
    dhv = load(dhpa, j)
    fmul, fsub = builder.fmul, builder.fsub
    store(fmul(dhv, fsub(og, fmul(fmul(og, tc), tc))), dva, j)
    store(fmul(fmul(dhv, tc), fsub(og, fmul(og, og))), dga, offset(3))
    with builder.if_then(builder.icmp_unsigned("!=", want, ir.Constant(want.type, 0))):
        store(fmul(og, tc), hprea, j)


def _variant_gate_backward_body(builder, m, load, store, offset, args):
    """variant_gate_backward_block (a, dg rows of 4H; the others of H; zc zeros without zoneout,
    p_* zeros without peepholes): keep = zc dc, d = dcv + (dc - keep) + do p_o (dL/dc~), then
    dg's i, f, g rows and dc[j..] = d f + keep + di p_i + df p_f (dL/dc_{t-1})."""
    aa, cpa, dcva, dca, zca, dga, pia, pfa, poa = args[:9]
    j = offset(0)
    fmul, fsub, fadd = builder.fmul, builder.fsub, builder.fadd

    def fma(x, y, z):
        return builder.call(m.fma, [x, y, z])

    ig, fg, gg = (load(aa, offset(g)) for g in range(3))
    dc = load(dca, j)
    keep = fmul(load(zca, j), dc)
    d = fma(load(dga, offset(3)), load(poa, j), fadd(load(dcva, j), fsub(dc, keep)))
    dzi = fmul(fmul(d, gg), fsub(ig, fmul(ig, ig)))
    dzf = fmul(fmul(d, load(cpa, j)), fsub(fg, fmul(fg, fg)))
    store(dzi, dga, offset(0))
    store(dzf, dga, offset(1))
    store(fmul(d, fsub(ig, fmul(fmul(ig, gg), gg))), dga, offset(2))
    store(fma(dzf, load(pfa, j), fma(dzi, load(pia, j), fma(d, fg, keep))), dca, j)


@intrinsic
def variant_gate_block(typingctx, a, q, bias, p_i, p_f, p_o, c, cn, H, j):
    return types.void(a, q, bias, p_i, p_f, p_o, c, cn, H, j), _pointer_codegen(_variant_gate_body, 1)


@intrinsic
def out_tanh_block(typingctx, a, v, out, H, j):
    return types.void(a, v, out, H, j), _pointer_codegen(_out_tanh_body, 1)


@intrinsic
def variant_out_backward_block(typingctx, a, v, dhp, dg, dv, hpre, want_hpre, H, j):
    return types.void(a, v, dhp, dg, dv, hpre, want_hpre, H, j), _pointer_codegen(_out_backward_body, 1)


@intrinsic
def variant_gate_backward_block(typingctx, a, cprev, dcv, dc, zc, dg, p_i, p_f, p_o, H, j):
    sig = types.void(a, cprev, dcv, dc, zc, dg, p_i, p_f, p_o, H, j)
    return sig, _pointer_codegen(_variant_gate_backward_body, 1)
