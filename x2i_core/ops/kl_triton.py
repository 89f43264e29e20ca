"""Triton kernels of the fused X2I distillation loss (see :mod:`x2i_core.ops.kl`).

One program per row of width D (padded to a power of two): load the student and
teacher rows, normalise (mean / unbiased std), scale by 1/T, log-softmax, and
either reduce to the row's KL or write the row's gradient.  Nothing but the
inputs and the per-row output is ever stored.  Imported lazily: set
``TRITON_INTERPRET=1`` before the first call to run on the CPU.
"""

import triton
import triton.language as tl


@triton.jit
def _row_stats(x_ptr, row, D, offs, mask, inv_t, eps):
    # row offsets in int64: rows x D passes 2**31 at real capture sizes (e.g. 4 x 24 heads x 4608^2)
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
def kl_fwd(s_ptr, t_ptr, out_ptr, D, inv_t, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    _, _, log_ps = _row_stats(s_ptr, row, D, offs, mask, inv_t, eps)
    _, _, log_pt = _row_stats(t_ptr, row, D, offs, mask, inv_t, eps)
    ps = tl.where(mask, tl.exp(log_ps), 0.0)
    kl = tl.sum(tl.where(mask, ps * (log_ps - log_pt), 0.0), axis=0)
    tl.store(out_ptr + row, kl)


@triton.jit
def kl_bwd(s_ptr, t_ptr, g_ptr, D, inv_t, eps, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    sc, sd, log_ps = _row_stats(s_ptr, row, D, offs, mask, inv_t, eps)
    _, _, log_pt = _row_stats(t_ptr, row, D, offs, mask, inv_t, eps)
    ps = tl.where(mask, tl.exp(log_ps), 0.0)
    diff = tl.where(mask, log_ps - log_pt, 0.0)
    kl = tl.sum(ps * diff, axis=0)
    g_n = ps * (diff - kl) * scale * inv_t
    denom = eps + sd
    g_mean = tl.sum(g_n, axis=0) / D
    dot = tl.sum(g_n * sc, axis=0)
    g = (g_n - g_mean) / denom - sc * dot / ((D - 1) * tl.maximum(sd, 1e-30) * denom * denom)
    tl.store(g_ptr + row.to(tl.int64) * D + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
