"""Smaller MLLMs: weight-only int8 (CPU and GPU, no extra package) and bitsandbytes 8/4-bit (CUDA).

``int8``: every ``nn.Linear`` of the text decoder's layers keeps its weight as
int8 with one float scale per output channel (symmetric, absmax / 127) and
multiplies with torch's int8 weight-pack kernel (``torch._weight_int8pack_mm``)
for bf16 on CPU and dequantises on the fly otherwise.  Embeddings, the final
norm, the LM head and the vision / audio towers stay in the load dtype.  The
decoder's weights take ~1/2 of bf16's memory (1/4 of fp32's).

``bnb8`` / ``bnb4``: transformers' bitsandbytes integration
(``BitsAndBytesConfig(load_in_8bit=True)`` / ``load_in_4bit=True``, nf4,
bf16 compute), CUDA only; needs ``pip install bitsandbytes``.  Towers and the
LM head are skipped as with int8.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import X2IInputError

QUANT_CHOICES = ("none", "int8", "bnb8", "bnb4")


class Int8Linear(nn.Module):
    """A weight-only int8 stand-in for ``nn.Linear`` (per-output-channel scales)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.device.type == "cpu" and flat.dtype == torch.bfloat16:
            # torch's CPU int8 weight-pack kernel (fast for bf16; its fp32 path is slower than dequantising)
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale.to(flat.dtype))
        else:
            out = flat @ (self.weight_int8.to(flat.dtype) * self.scale.to(flat.dtype)[:, None]).t()
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def replace_linears(layers: nn.Module, make) -> int:
    """Replace every plain ``nn.Linear`` under ``layers`` (the decoder's layer list) by ``make(linear)`` in
    place; returns the count."""
    count = 0
    for _name, module in list(layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, make(child))
                count += 1
    return count


def quantize_int8(layers: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``layers`` by an :class:`Int8Linear`; returns the count."""
    return replace_linears(layers, Int8Linear)


def check_quant(quant: str | None, device: torch.device) -> str:
    q = (quant or "none").lower()
    if q not in QUANT_CHOICES:
        raise X2IInputError(f"quantisation {quant!r} is unknown; expected one of {list(QUANT_CHOICES)}")
    if q in ("bnb8", "bnb4"):
        if torch.device(device).type != "cuda":
            raise X2IInputError(f"quantisation '{q}' (bitsandbytes) runs on CUDA GPUs only; on CPU use 'int8'")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise X2IInputError(f"quantisation '{q}' needs the bitsandbytes package: pip install bitsandbytes "
                                "(or use 'int8', which needs nothing extra)") from None
    return q


def bnb_config(quant: str, skip: list[str]):
    from transformers import BitsAndBytesConfig

    if quant == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=skip)
