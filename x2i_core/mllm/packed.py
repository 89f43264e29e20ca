"""CPU matrix products through oneDNN with weights packed once (``cpu_matmul``).

On x86 CPUs torch's ``nn.Linear`` runs the BLAS ``sgemm``; for the few rows a
short prompt gives (40 tokens after the cached opening) it reaches a fraction
of its 512-row throughput.  oneDNN's linear over a weight reordered once into
its blocked layout (the path inductor's ``freezing`` takes) is ~2.3x faster at
40 rows and ~1.5x at 512 in fp32 on a 2-core AVX-512 CPU (``benchmarks/encode.py
--gemm``).  The products stay fp32 (fp32 accumulation in another order:
round-off-level differences, no reduced precision).

``cpu_matmul``:

* ``torch``  - keep ``nn.Linear`` (the reference's kernels);
* ``onednn`` - replace every ``nn.Linear`` of the text decoder's layers by a
  :class:`PackedLinear` (the packed copy replaces the weight: no extra memory);
  CPU only, fp32 or bf16, not with quantisation;
* ``auto``   - ``onednn`` for an fp32 decoder on a CPU whose torch has oneDNN,
  else ``torch`` (in bf16 the gain is small at few rows and negative at 512).

Moving a packed decoder (``.to("cuda")``, ``.half()``) unpacks its weights
first (exact), so the move completes and the model runs with ``F.linear`` from
then on.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import X2IInputError
from .quant import replace_linears

MATMUL_CHOICES = ("auto", "torch", "onednn")
_PACK_DTYPES = (torch.float32, torch.bfloat16)
ROWS_HINT = 64  # the row count oneDNN's weight layout is chosen for (a short prompt after the opening)


@functools.lru_cache(maxsize=None)
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch can pack and run a ``dtype`` linear through oneDNN (tried once on a tiny weight)."""
    if dtype not in _PACK_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(4, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 4), 8.0, dtype=dtype)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def resolve_cpu_matmul(choice: str | None, device: torch.device | str, dtype: torch.dtype,
                       quant: str = "none") -> str:
    """'torch' or 'onednn' for this load; refuses an explicit 'onednn' where it cannot run."""
    c = (choice or "auto").lower()
    if c not in MATMUL_CHOICES:
        raise X2IInputError(f"cpu_matmul {choice!r} is unknown; expected one of {list(MATMUL_CHOICES)}")
    on_cpu = torch.device(device).type == "cpu"
    if c == "auto":
        return "onednn" if on_cpu and dtype == torch.float32 and quant == "none" and onednn_available(dtype) \
            else "torch"
    if c == "onednn":
        if not on_cpu:
            raise X2IInputError(f"cpu_matmul 'onednn' is for an MLLM that runs on the CPU; this one runs on "
                                f"{torch.device(device)} (use 'auto' or 'torch')")
        if quant != "none":
            raise X2IInputError(f"cpu_matmul 'onednn' packs the unquantised weights; quantisation {quant!r} "
                                "replaces them: choose one of the two")
        if not onednn_available(dtype):
            raise X2IInputError(f"cpu_matmul 'onednn' needs a torch with oneDNN (mkldnn) and an fp32 or bf16 "
                                f"model; this is {dtype} with mkldnn "
                                f"{'available' if torch.backends.mkldnn.is_available() else 'missing'} "
                                "(use 'auto' or 'torch')")
    return c


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight lives in oneDNN's blocked layout (CPU, inference only).

    Moving it off the CPU or to another dtype (``.to()``, ``.half()``, a host's offload) first unpacks the weight
    into a plain ``weight`` parameter, so the move completes like any module's; it then runs ``F.linear``."""

    def __init__(self, linear: nn.Linear, rows_hint: int = ROWS_HINT):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_dtype = weight.dtype
        # a plain attribute, not a buffer: oneDNN's opaque tensor has no storage to save, share or move
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        self.weight = None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return nn.functional.linear(x, self.weight, self.bias)
        if x.device.type != "cpu" or x.dtype != self.packed_dtype:
            raise X2IInputError(f"this MLLM's decoder is packed for the CPU in {self.packed_dtype} "
                                f"(cpu_matmul='onednn'); got input on {x.device} in {x.dtype}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise X2IInputError("a packed decoder (cpu_matmul='onednn') is for inference only; load it with "
                                "cpu_matmul='torch' to take gradients through it")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unpack(self) -> None:
        """Back to a plain weight (the exact values packed)."""
        if self.packed is not None:
            self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
            self.packed = None

    def _apply(self, fn, recurse=True):
        if self.packed is not None:
            probe = fn(torch.empty(0, dtype=self.packed_dtype))
            if probe.device.type != "cpu" or probe.dtype != self.packed_dtype:
                self.unpack()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kind = f"oneDNN-packed {self.packed_dtype}" if self.packed is not None else "unpacked"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def pack_linears(layers: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``layers`` by a :class:`PackedLinear`; returns the count."""
    return replace_linears(layers, PackedLinear)
