"""The fused (Triton) and row-wise loss paths against the PyTorch reference, forward and gradient."""

import pytest
import torch
import torch.nn.functional as F

from x2i_core.ops.kl import distill_loss, kl_fused, kl_reference, kl_rowwise, triton_available

SHAPES = [(2, 5, 3072), (1, 3, 3071), (3, 7, 33), (2, 1, 2), (1, 4, 4096)]


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype)
    t = (torch.randn(shape, generator=g) * 0.5 - 1).to(dtype)
    return s, t


def test_reference_is_the_published_expression():
    s, t = _pair((2, 6, 40), torch.float32)

    def norm(x):
        return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))

    expected = F.kl_div(F.softmax(norm(t) / 3, dim=-1).log(), F.softmax(norm(s) / 3, dim=-1), reduction="batchmean")
    assert torch.allclose(kl_reference(s, t), expected, rtol=1e-6, atol=1e-7)
    # KL(student || teacher): sum p_s (log p_s - log p_t) / B
    ps, pt = F.softmax(norm(s) / 3, -1), F.softmax(norm(t) / 3, -1)
    assert torch.allclose(kl_reference(s, t), (ps * (ps.log() - pt.log())).sum() / 2, rtol=1e-5)


def _check(fn, shape, dtype, fwd_tol, grad_tol):
    s, t = _pair(shape, dtype, seed=sum(shape))
    s_ref = s.float().clone().requires_grad_()
    ref = kl_reference(s_ref, t.float())
    ref.backward()
    s_x = s.clone().requires_grad_()
    got = fn(s_x, t)
    got.backward()
    assert abs(got.item() - ref.item()) <= fwd_tol * max(1.0, abs(ref.item()))
    scale = s_ref.grad.abs().max().item() + 1e-12
    # D=2 is degenerate (normalised rows are always ±0.707): gradients are pure round-off there.
    assert (s_x.grad.float() - s_ref.grad).abs().max().item() <= grad_tol * scale + 1e-7
    assert s_x.grad.dtype == dtype


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 2e-2)])
def test_rowwise_matches_reference(shape, dtype, fwd_tol, grad_tol):
    _check(kl_rowwise, shape, dtype, fwd_tol, grad_tol)


@pytest.mark.skipif(not triton_available("cpu") and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU)")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 2e-2)])
def test_fused_triton_kernel_matches_reference(shape, dtype, fwd_tol, grad_tol):
    _check(kl_fused, shape, dtype, fwd_tol, grad_tol)


CHUNKED = [((1, 3, 50), 16), ((1, 2, 64), 16), ((2, 1, 100), 32), ((1, 2, 257), 32), ((1, 2, 257), 256)]


@pytest.mark.skipif(not triton_available("cpu") and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU)")
@pytest.mark.parametrize("shape,chunk", CHUNKED)
@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-4, 2e-2)])
def test_fused_triton_kernel_loops_over_wide_rows(shape, chunk, dtype, fwd_tol, grad_tol):
    """Rows wider than one chunk: the kernels loop over column chunks (the last one ragged)."""
    _check(lambda s, t: kl_fused(s, t, chunk=chunk), shape, dtype, fwd_tol, grad_tol)


@pytest.mark.skipif(not triton_available("cpu") and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest on CPU)")
def test_fused_chunking_agrees_with_one_block_and_checks_the_chunk():
    """Chunked and whole-row kernels differ only by fp32 summation order."""
    s, t = _pair((1, 3, 96), torch.float32, seed=3)
    runs = []
    for chunk in (None, 16):
        s_x = s.clone().requires_grad_()
        loss = kl_fused(s_x, t, chunk=chunk)
        loss.backward()
        runs.append((loss.item(), s_x.grad))
    (loss0, grad0), scale = runs[0], runs[0][1].abs().max().item()
    for loss, grad in runs[1:]:
        assert abs(loss - loss0) <= 1e-5 * abs(loss0)
        assert (grad - grad0).abs().max().item() <= 1e-5 * scale
    with pytest.raises(ValueError, match="power of two"):
        kl_fused(s, t, chunk=48)


def test_identical_rows_give_zero_and_backends_are_selectable():
    s, _ = _pair((2, 3, 64), torch.float32)
    assert kl_rowwise(s, s.clone()).abs().item() < 1e-6
    for backend in ("reference", "rowwise"):
        assert distill_loss(s, s * 2 + 1, backend=backend).abs().item() < 1e-5  # invariant to affine maps
    with pytest.raises(ValueError, match="backend"):
        distill_loss(s, s, backend="magic")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_rowwise(s, s[:, :2])
