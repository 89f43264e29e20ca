"""Qwen2.5-VL (3B / 7B Instruct) as the X2I MLLM: text, images and video."""

from __future__ import annotations

import torch

from .. import registry
from .chat import ChatEncoder, load_pil_processor, read_model_config, resolve_dtype
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
        from transformers import Qwen2_5_VLForConditionalGeneration

        full = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, **kwargs)
        # The slow (PIL) image processor, as transformers 4.49 ran it for the reference; the fast one resizes
        # with torch's bicubic and differs by ~1e-2 (tests/test_reference_oracle.py).
        processor = load_pil_processor(path)
        return full, full.model, processor

    def forward_inputs(self, batch):
        """M-RoPE positions computed by the pack, as 4.49 computed them (:func:`~.mrope.qwen25vl_positions`), so
        every transformers gets the same ones; the model's cached rope deltas (for decoding) are cleared."""
        from .mrope import qwen25vl_positions

        cfg = self.model.config
        self.model.rope_deltas = None
        if "input_ids" not in batch or "position_ids" in batch:  # the caller's positions win (the opening cache)
            return {}
        pos = qwen25vl_positions(
            batch["input_ids"], batch.get("attention_mask"), image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
            merge=cfg.vision_config.spatial_merge_size, tokens_per_second=cfg.vision_config.tokens_per_second,
            image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
            second_per_grid_ts=batch.get("second_per_grid_ts"))
        return {"position_ids": pos.to(batch["input_ids"].device)}
