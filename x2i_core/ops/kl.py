"""The X2I attention-distillation loss, three ways.

For a pair of captured attention outputs ``student, teacher`` of shape
``[B, tokens, D]``::

    norm(x) = (x - mean(x)) / (1e-7 + std(x))        # over D, unbiased std (torch.std)
    p_s = softmax(norm(student) / T),  p_t = softmax(norm(teacher) / T)
    loss = sum_{tokens, D} p_s * (log p_s - log p_t) / B      # KL(student || teacher), "batchmean"

* :func:`kl_reference` - the straightforward PyTorch expression (the oracle);
  it materialises the normalised, softmax and log tensors.
* :func:`kl_rowwise` - a PyTorch autograd function that keeps only the inputs
  and recomputes per row in backward, in chunks of rows (CPU / fallback).
* :func:`kl_fused` - Triton kernels, one program per row (normalise ->
  softmax(T) -> KL, and its gradient) without materialising any softmax
  tensor: a row up to ``kl_triton.MAX_BLOCK`` (4096) wide is read once into
  registers; a wider one is walked in chunks of that width (a few passes
  over the row, see :mod:`x2i_core.ops.kl_triton`).  Runs on CUDA, and on CPU under
  ``TRITON_INTERPRET=1`` (how CI checks it).

Gradients flow to ``student`` only (the teacher is a frozen target).
"""

from __future__ import annotations

import os

import torch

EPS = 1e-7
TEMPERATURE = 3.0


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True)
    return (x - mean) / (EPS + std)


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """``F.kl_div(log softmax_t, softmax_s, 'batchmean')`` as the reference computes it."""
    log_pt = torch.log(torch.softmax(_normalize(teacher) / temperature, dim=-1))
    ps = torch.softmax(_normalize(student) / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_pt, ps, reduction="batchmean")


# ---------------------------------------------------------------------------
# Row-wise PyTorch path (memory-lean fallback)
# ---------------------------------------------------------------------------

def _row_terms(s: torch.Tensor, t: torch.Tensor, temperature: float):
    """fp32 per-row pieces: centred s, its std, log p_s, p_s, log p_t."""
    s = s.float()
    t = t.float()
    sc = s - s.mean(dim=-1, keepdim=True)
    sd = sc.pow(2).sum(-1, keepdim=True).div(s.shape[-1] - 1).sqrt()
    zs = sc / (EPS + sd) / temperature
    tc = t - t.mean(dim=-1, keepdim=True)
    td = tc.pow(2).sum(-1, keepdim=True).div(t.shape[-1] - 1).sqrt()
    zt = tc / (EPS + td) / temperature
    log_ps = zs - torch.logsumexp(zs, dim=-1, keepdim=True)
    log_pt = zt - torch.logsumexp(zt, dim=-1, keepdim=True)
    return sc, sd, log_ps, log_pt


def _row_grad(s, t, temperature: float, scale: float) -> torch.Tensor:
    """d loss / d s for rows ``s`` (loss = scale * sum_rows KL_row)."""
    d = s.shape[-1]
    sc, sd, log_ps, log_pt = _row_terms(s, t, temperature)
    ps = log_ps.exp()
    diff = log_ps - log_pt
    kl = (ps * diff).sum(-1, keepdim=True)
    g_z = ps * (diff - kl) * scale
    g_n = g_z / temperature
    denom = EPS + sd
    g_s = (g_n - g_n.mean(-1, keepdim=True)) / denom
    g_s = g_s - sc * (g_n * sc).sum(-1, keepdim=True) / ((d - 1) * sd.clamp_min(1e-30) * denom * denom)
    return g_s


class _RowwiseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, chunk):
        d = student.shape[-1]
        s2 = student.detach().reshape(-1, d)
        t2 = teacher.detach().reshape(-1, d)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for i in range(0, s2.shape[0], chunk):
            _, _, log_ps, log_pt = _row_terms(s2[i:i + chunk], t2[i:i + chunk], temperature)
            total += (log_ps.exp() * (log_ps - log_pt)).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        ctx.chunk = chunk
        return total / student.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher = ctx.saved_tensors
        d = student.shape[-1]
        s2 = student.detach().reshape(-1, d)
        t2 = teacher.detach().reshape(-1, d)
        scale = float(grad_out) / student.shape[0]
        grad = torch.empty_like(s2)
        for i in range(0, s2.shape[0], ctx.chunk):
            grad[i:i + ctx.chunk] = _row_grad(s2[i:i + ctx.chunk], t2[i:i + ctx.chunk], ctx.temperature, scale).to(grad.dtype)
        return grad.view_as(student), None, None, None


def kl_rowwise(student, teacher, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    _check(student, teacher)
    return _RowwiseKL.apply(student, teacher, float(temperature), int(chunk))


# ---------------------------------------------------------------------------
# Triton fused kernels
# ---------------------------------------------------------------------------

_KERNELS = None


def _triton_kernels():
    """Import the kernels on first use (so TRITON_INTERPRET set by a caller is honoured)."""
    global _KERNELS
    if _KERNELS is None:
        import triton

        from . import kl_triton

        _KERNELS = (triton, kl_triton)
    return _KERNELS


def triton_available(device: torch.device | str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    dev = torch.device(device)
    return dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _launch(triton, kernels, d: int, chunk: int | None):
    """(forward kernel, backward kernel, BLOCK, num_warps).  A row that fits one block (its width padded to a
    power of two, at most ``kl_triton.MAX_BLOCK`` or ``chunk``) runs the whole-row kernels with Triton's default
    warps, as before the chunked kernels existed; a wider row runs the chunked kernels on chunks of the cap,
    with 8 warps for chunks of 2048+ (ptxas, sm_90: 4 warps on a 4096 chunk take 222-254 registers a thread,
    8 warps 80-128)."""
    cap = kernels.MAX_BLOCK if chunk is None else int(chunk)
    if cap < 1 or cap & (cap - 1):
        raise ValueError(f"fused loss chunk must be a positive power of two, got {chunk!r}")
    whole = triton.next_power_of_2(d)
    if whole <= cap:
        return kernels.kl_fwd_row, kernels.kl_bwd_row, whole, 4
    return kernels.kl_fwd, kernels.kl_bwd, cap, 8 if cap >= 2048 else 4


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, chunk):
        triton, kernels = _triton_kernels()
        d = student.shape[-1]
        fwd, bwd, block, warps = _launch(triton, kernels, d, chunk)
        s2 = student.detach().reshape(-1, d).contiguous()
        t2 = teacher.detach().reshape(-1, d).contiguous()
        rows = s2.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=student.device)
        fwd[(rows,)](s2, t2, out, d, 1.0 / temperature, EPS, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(s2, t2)
        ctx.temperature = temperature
        ctx.launch = bwd, block, warps
        ctx.batch = student.shape[0]
        ctx.shape = student.shape
        return out.sum() / student.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        s2, t2 = ctx.saved_tensors
        rows, d = s2.shape
        grad = torch.empty_like(s2)
        scale = float(grad_out) / ctx.batch
        bwd, block, warps = ctx.launch
        bwd[(rows,)](s2, t2, grad, d, 1.0 / ctx.temperature, EPS, scale, BLOCK=block, num_warps=warps)
        return grad.view(ctx.shape), None, None, None


def kl_fused(student, teacher, temperature: float = TEMPERATURE, chunk: int | None = None) -> torch.Tensor:
    """``chunk`` (a power of two) overrides the kernels' column chunk cap ``kl_triton.MAX_BLOCK`` (tests)."""
    _check(student, teacher)
    return _FusedKL.apply(student, teacher, float(temperature), chunk)


def _check(student, teacher):
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} captures differ in shape")
    if student.shape[-1] < 2:
        raise ValueError("feature width must be at least 2 for an unbiased std")


def distill_loss(student, teacher, temperature: float = TEMPERATURE, backend: str = "auto") -> torch.Tensor:
    """One pair's loss with the chosen backend: auto (fused on CUDA, row-wise elsewhere), fused, rowwise, reference."""
    if backend == "auto":
        backend = "fused" if student.is_cuda and triton_available(student.device) else "rowwise"
    if backend == "fused":
        return kl_fused(student, teacher, temperature)
    if backend == "rowwise":
        return kl_rowwise(student, teacher, temperature)
    if backend == "reference":
        return kl_reference(student, teacher, temperature)
    raise ValueError(f"loss backend {backend!r} is unknown; expected auto, fused, rowwise or reference")


def finite_or_skip(value: torch.Tensor) -> bool:
    """The reference skips pairs whose loss is inf/NaN."""
    return bool(torch.isfinite(value).all())


__all__ = ["kl_reference", "kl_rowwise", "kl_fused", "distill_loss", "finite_or_skip", "TEMPERATURE"]
