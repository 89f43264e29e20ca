"""InternVL (2.5 / 3, the transformers ``-hf`` format) as the X2I MLLM: text, images and video.

The released X2I AlignNets for InternVL2.5-1B (C=25, H=896) and -4B (H=2048)
fit the text decoder of these models.  Images are tiled by the folder's image
processor (448-pixel tiles plus a thumbnail); video frames are one tile each.
The original remote-code InternVL layout (``model_type`` ``internvl_chat``) is
not read: use the ``-hf`` release of the same model.

InternVL's decoder uses plain 1-D rotary positions, so a padded batch is run
with the positions ``generate()`` would give it (``cumsum(mask) - 1``; pads 1)
- what the reference's prefill computes - instead of ``0..S-1``.
"""

from __future__ import annotations

import torch

from .chat import ChatEncoder


class InternVLEncoder(ChatEncoder):
    family = "internvl"
    display = "InternVL"
    model_types = ("internvl",)
    modalities = frozenset({"text", "image", "video"})
    placeholders = ("<IMG_CONTEXT>", "<img>", "</img>", "<video>")
    left_pad_exact = True  # tests/test_family_internvl.py checks the fill against the padded forward
    right_pad_rows_shared = True  # the same tests compare the right-padded presets with the padded forward

    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, **kwargs):
        from transformers import AutoProcessor, InternVLForConditionalGeneration

        full = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, **kwargs)
        processor = AutoProcessor.from_pretrained(path)
        return full, full.model, processor

    def media_token_ids(self) -> set[int]:
        return {int(self.model.config.image_token_id)}

    def processor_inputs(self, built):
        kwargs = {"text": [built.text], "padding": False, "return_tensors": "pt"}
        if built.images:
            kwargs["images"] = built.images
        if built.videos:
            kwargs["videos"] = built.videos
        return dict(self.processor(**kwargs))

    def forward_inputs(self, batch):
        mask = batch["attention_mask"]
        positions = mask.long().cumsum(-1) - 1
        return {"position_ids": positions.masked_fill(mask == 0, 1)}
