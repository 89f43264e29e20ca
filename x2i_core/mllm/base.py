"""The encoder protocol shared by every MLLM family."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import torch


@dataclasses.dataclass
class EncodeRequest:
    """One prompt: text and/or media.  Media are in prompt order (images first, then videos)."""

    text: str | None = None
    images: Any = None   # None, one image, a list, or a [N, H, W, C] batch
    videos: Any = None   # None, one video (list of frames / [T, H, W, C]) or a list of videos


@dataclasses.dataclass
class HiddenStates:
    """What an MLLM encode returns: ``hidden [B, C, S, H]`` with ``C = layers + 1``."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor   # [B, S], 1 = real token, 0 = padding
    mllm: str                      # a name for messages ("Qwen2.5-VL (…/Qwen2.5-VL-3B)")
    preset: str
    lengths: list[int]             # real tokens per prompt (before padding)

    @property
    def channels(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[-1])


class MLLMEncoder(Protocol):
    name: str
    channels: int       # layers + 1
    hidden_size: int

    def encode(self, requests: EncodeRequest | Sequence[EncodeRequest], preset: str | None = None,
               image_size: int | None = None) -> HiddenStates:
        ...
