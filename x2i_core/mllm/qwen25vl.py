"""Qwen2.5-VL (3B / 7B Instruct) as the X2I MLLM: text, images and video."""

from __future__ import annotations

import torch

from .. import registry
from .chat import ChatEncoder, read_model_config, resolve_dtype
from .prompting import ChatPrompt

FAMILY = registry.family("qwen2.5-vl")
MODEL_TYPE = FAMILY.model_types[0]

__all__ = ["Qwen25VLEncoder", "Qwen25VLPrompt", "read_model_config", "resolve_dtype", "MODEL_TYPE"]


class Qwen25VLPrompt(ChatPrompt):
    """Qwen2.5-VL's prompt side (also ComfyUI's native Qwen2.5-VL node's, which has no transformers model)."""

    def chat_kwargs(self, spec):
        # "Picture 1: " / "Video 1: " ids before the placeholders, as the reference nodes ask for.
        return {"add_vision_id": True} if spec.vision_ids else {}


class Qwen25VLEncoder(Qwen25VLPrompt, ChatEncoder, family="qwen2.5-vl"):  # facts: x2i_core.registry
    """Loads a Qwen2.5-VL model folder and encodes X2I prompts."""

    left_pad_exact = True  # tests/test_encoder_parity.py: pad rows equal across prompts, real rows = unpadded
    right_pad_rows_shared = True  # the same tests compare the right-padded presets with the padded forward

    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, **kwargs):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        full = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, **kwargs)
        # The slow (PIL) image processor, as transformers 4.49 ran it for the reference; the fast one resizes
        # with torch's bicubic and differs by ~1e-2 (tests/test_reference_oracle.py).
        processor = AutoProcessor.from_pretrained(path, use_fast=False)
        return full, full.model, processor
