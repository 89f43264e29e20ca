"""Triton kernels of the fused X2I distillation loss (see :mod:`x2i_core.ops.kl`).

One program per row of width D.  The row is walked in chunks of ``BLOCK``
columns (a power of two; the launcher uses ``min(next_power_of_2(D),
MAX_BLOCK)``) by loops with a run-time trip count, so a wide row never needs a
register tile of the whole row and the loops are not unrolled.  For the
student and the teacher row each:

1. mean, then the unbiased std from the sum of squared deviations about that
   mean (two passes, no E[x^2] - E[x]^2 cancellation);
2. the log-sum-exp of the normalised rows scaled by 1/T, in one pass with a
   running maximum and a rescaled running sum.

Then ``kl_fwd`` sums ``p_s * (log p_s - log p_t)`` into the row's KL, and
``kl_bwd`` computes that KL, then the two row reductions of the gradient
(``sum g_n`` and ``sum g_n * (s - mean)``), then writes the row's gradient.
Every pass re-reads the inputs; nothing but the inputs and the per-row output
is ever stored.  When D fits in one chunk every loop runs once and the
arithmetic is that of a single whole-row block.  Row offsets are int64.
``kl_fwd_row`` / ``kl_bwd_row`` are the whole-row kernels the launcher uses
when D fits one block (the row is read once and kept in registers); the
chunked ``kl_fwd`` / ``kl_bwd`` serve wider rows.  Imported lazily: set
``TRITON_INTERPRET=1`` before the first call to run on the CPU.
"""

import triton
import triton.language as tl

# Largest chunk (columns per loop iteration) the launcher uses; wider rows loop.
MAX_BLOCK = 4096
# ``while`` rather than ``for ... in range(0, D, BLOCK)``: Triton 3.6's interpreter cannot take a run-time
# scalar as a range bound under NumPy >= 2.4 (triton-lang/triton#9171), and a constexpr chunk count would let
# LLVM unroll the loops and multiply the live registers.


@triton.jit
def _mean_std(x_row, D, offs, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < D:
        cols = start + offs
        acc += tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
        start += BLOCK
    mean = tl.sum(acc, axis=0) / D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < D:
        cols = start + offs
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean, 0.0)
        acc += xc * xc
        start += BLOCK
    std = tl.sqrt(tl.sum(acc, axis=0) / (D - 1))
    return mean, std


@triton.jit
def _centred_z(x_row, cols, mask, mean, std, inv_t, eps):
    """The chunk's centred values and its normalised, 1/T-scaled values (0 off the row)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    xc = tl.where(mask, x - mean, 0.0)
    return xc, xc / (eps + std) * inv_t


@triton.jit
def _lse(x_row, D, offs, mean, std, inv_t, eps, BLOCK: tl.constexpr):
    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.zeros([], dtype=tl.float32)
    start = 0
    while start < D:
        cols = start + offs
        mask = cols < D
        _, z = _centred_z(x_row, cols, mask, mean, std, inv_t, eps)
        z = tl.where(mask, z, -float("inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=0))  # finite: every chunk holds a column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.where(mask, tl.exp(z - new_max), 0.0), axis=0)
        run_max = new_max
        start += BLOCK
    return run_max + tl.log(run_sum)


@triton.jit
def _chunk_terms(s_row, t_row, cols, mask, s_mean, s_std, s_lse, t_mean, t_std, t_lse, inv_t, eps):
    """Centred student, p_s and log p_s - log p_t over one chunk (all 0 off the row)."""
    sc, zs = _centred_z(s_row, cols, mask, s_mean, s_std, inv_t, eps)
    _, zt = _centred_z(t_row, cols, mask, t_mean, t_std, inv_t, eps)
    log_ps = tl.where(mask, zs - s_lse, 0.0)
    log_pt = tl.where(mask, zt - t_lse, 0.0)
    ps = tl.where(mask, tl.exp(log_ps), 0.0)
    return sc, ps, tl.where(mask, log_ps - log_pt, 0.0)


@triton.jit
def _row_kl(s_row, t_row, D, offs, inv_t, eps, BLOCK: tl.constexpr):
    s_mean, s_std = _mean_std(s_row, D, offs, BLOCK)
    t_mean, t_std = _mean_std(t_row, D, offs, BLOCK)
    s_lse = _lse(s_row, D, offs, s_mean, s_std, inv_t, eps, BLOCK)
    t_lse = _lse(t_row, D, offs, t_mean, t_std, inv_t, eps, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < D:
        cols = start + offs
        _, ps, diff = _chunk_terms(s_row, t_row, cols, cols < D, s_mean, s_std, s_lse, t_mean, t_std, t_lse,
                                   inv_t, eps)
        acc += ps * diff
        start += BLOCK
    return tl.sum(acc, axis=0), s_mean, s_std, s_lse, t_mean, t_std, t_lse


@triton.jit
def kl_fwd(s_ptr, t_ptr, out_ptr, D, inv_t, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    # int64 row offsets: rows x D passes 2**31 past ~700k rows of 3072 (e.g. a batch of 160 captures of 4608 tokens)
    base = row.to(tl.int64) * D
    offs = tl.arange(0, BLOCK)
    kl, _, _, _, _, _, _ = _row_kl(s_ptr + base, t_ptr + base, D, offs, inv_t, eps, BLOCK)
    tl.store(out_ptr + row, kl)


@triton.jit
def kl_bwd(s_ptr, t_ptr, g_ptr, D, inv_t, eps, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    s_row = s_ptr + base
    t_row = t_ptr + base
    g_row = g_ptr + base
    offs = tl.arange(0, BLOCK)
    kl, s_mean, sd, s_lse, t_mean, t_std, t_lse = _row_kl(s_row, t_row, D, offs, inv_t, eps, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dot = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < D:
        cols = start + offs
        sc, ps, diff = _chunk_terms(s_row, t_row, cols, cols < D, s_mean, sd, s_lse, t_mean, t_std, t_lse,
                                    inv_t, eps)
        g_n = ps * (diff - kl) * scale * inv_t
        acc_g += g_n
        acc_dot += g_n * sc
        start += BLOCK
    g_mean = tl.sum(acc_g, axis=0) / D
    dot = tl.sum(acc_dot, axis=0)
    denom = eps + sd
    corr_den = (D - 1) * tl.maximum(sd, 1e-30) * denom * denom
    start = 0
    while start < D:
        cols = start + offs
        mask = cols < D
        sc, ps, diff = _chunk_terms(s_row, t_row, cols, mask, s_mean, sd, s_lse, t_mean, t_std, t_lse, inv_t, eps)
        g_n = ps * (diff - kl) * scale * inv_t
        g = (g_n - g_mean) / denom - sc * dot / corr_den
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
        start += BLOCK


# -- rows that fit one block (D <= the cap): the whole row in registers, every input read once ------------
@triton.jit
def _whole_row_stats(x_ptr, row, D, offs, mask, inv_t, eps):
    # row offsets in int64: rows x D passes 2**31 past ~700k rows of 3072
    x = tl.load(x_ptr + row.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    std = tl.sqrt(tl.sum(xc * xc, axis=0) / (D - 1))
    z = xc / (eps + std) * inv_t
    z = tl.where(mask, z, -float("inf"))
    zmax = tl.max(z, axis=0)
    lse = zmax + tl.log(tl.sum(tl.where(mask, tl.exp(z - zmax), 0.0), axis=0))
    return xc, std, tl.where(mask, z - lse, 0.0)


@triton.jit
def kl_fwd_row(s_ptr, t_ptr, out_ptr, D, inv_t, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    _, _, log_ps = _whole_row_stats(s_ptr, row, D, offs, mask, inv_t, eps)
    _, _, log_pt = _whole_row_stats(t_ptr, row, D, offs, mask, inv_t, eps)
    ps = tl.where(mask, tl.exp(log_ps), 0.0)
    kl = tl.sum(tl.where(mask, ps * (log_ps - log_pt), 0.0), axis=0)
    tl.store(out_ptr + row, kl)


@triton.jit
def kl_bwd_row(s_ptr, t_ptr, g_ptr, D, inv_t, eps, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    sc, sd, log_ps = _whole_row_stats(s_ptr, row, D, offs, mask, inv_t, eps)
    _, _, log_pt = _whole_row_stats(t_ptr, row, D, offs, mask, inv_t, eps)
    ps = tl.where(mask, tl.exp(log_ps), 0.0)
    diff = tl.where(mask, log_ps - log_pt, 0.0)
    kl = tl.sum(ps * diff, axis=0)
    g_n = ps * (diff - kl) * scale * inv_t
    denom = eps + sd
    g_mean = tl.sum(g_n, axis=0) / D
    dot = tl.sum(g_n * sc, axis=0)
    g = (g_n - g_mean) / denom - sc * dot / ((D - 1) * tl.maximum(sd, 1e-30) * denom * denom)
    tl.store(g_ptr + row.to(tl.int64) * D + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
