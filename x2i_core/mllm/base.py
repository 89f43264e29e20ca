"""The encoder protocol shared by every MLLM family."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import torch


@dataclasses.dataclass
class ChatTurn:
    """One earlier turn of a multi-turn conversation (``role`` is "user" or "assistant")."""

    role: str
    text: str | None = None
    images: Any = None
    videos: Any = None
    audios: Any = None
    instruction: str | None = None


@dataclasses.dataclass
class EncodeRequest:
    """One prompt: text and/or media, optionally after earlier chat turns.

    Media are placed before the text in the user message (images, then videos,
    then audio).  ``instruction`` fills the reference's "Instruction editing
    description" field (image + text editing).  ``history`` holds earlier turns;
    when the request itself has no text or media, the last history turn (a user
    turn) is the prompt.
    """

    text: str | None = None
    images: Any = None   # None, one image, a list, or a [N, H, W, C] batch
    videos: Any = None   # None, one video (list of frames / [T, H, W, C]) or a list of videos
    audios: Any = None   # None, one clip (ComfyUI AUDIO dict, AudioClip, (array, rate), path) or a list
    instruction: str | None = None
    history: Sequence[ChatTurn] = ()


@dataclasses.dataclass
class HiddenStates:
    """What an MLLM encode returns: ``hidden [B, C, S, H]`` with ``C = layers + 1``."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor   # [B, S], 1 = real token, 0 = padding
    mllm: str                      # a name for messages ("Qwen2.5-VL (…/Qwen2.5-VL-3B)")
    preset: str
    lengths: list[int]             # real tokens per prompt (before padding)
    family: str | None = None      # the encoder family ("qwen2.5-vl", ...), for the AlignNet check
    pad_rows: str | None = None    # left-pad row semantics when the prompts are left-padded, else None

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
               image_size: int | None = None, video_size: int | None = None) -> HiddenStates:
        ...

    def generate_answer(self, request: EncodeRequest, *, max_new_tokens: int = 128, temperature: float = 0.0,
                        seed: int = 0, image_size: int | None = None, answer: str = "states",
                        preset: str | None = None, video_size: int | None = None) -> tuple[str, HiddenStates]:
        ...
