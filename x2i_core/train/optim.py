"""Optimisers (AdamW, or bitsandbytes' 8-bit AdamW when asked for and installed) and the cosine schedule
with warm-up."""

from __future__ import annotations

import math

import torch

from ..errors import X2IInputError


# -- optimisation -------------------------------------------------------------------
def make_optimizer(params, name: str, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise X2IInputError("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes, CUDA only)") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise X2IInputError(f"optimizer {name!r} is unknown; expected adamw or adamw8bit")


def cosine_with_warmup(optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
