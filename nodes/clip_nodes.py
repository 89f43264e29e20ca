"""X2I CLIP Encode: the Qwen2.5-VL text encoders ComfyUI already loads (stock Load CLIP, types qwen_image and
omnigen2), used as the X2I MLLM.  The schema and the call; the forward that matches transformers' lives in
``comfy_qwen.py``."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..x2i_core.mllm.base import EncodeRequest
from .comfy_qwen import NODE, clip_description, clip_tooltip, encode_with_clip, vision_names
from .common import CATEGORY, PRESET_OPTIONS, NodeError, image_resolution_input, pad_rows_input, search_aliases
from .types import HIDDEN

PRESET_TOOLTIP = (
    "How the MLLM prompt is built (the reference code's three conventions, exactly as X2I MLLM Encode builds "
    "them). auto = 'training' for text-only prompts (what the AlignNet was trained on: instruction dict, left "
    "padding to 512) and 'comfyui' with an image (images first with a 224x224 budget, right padding to "
    "max(1.3x length, 512)); 'scripts' = plain text, images resized to 128x128, right padding to 512."
)


class X2ICLIPEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2ICLIPEncode", **search_aliases("X2ICLIPEncode"),
            display_name="X2I CLIP Encode (Qwen2.5-VL text encoder)",
            category=CATEGORY,
            description="Uses the Qwen2.5-VL text encoder you already load with the stock Load CLIP node "
                        f"({clip_description()}) as X2I's MLLM: same prompt presets and hidden states as X2I MLLM "
                        "Encode, run by ComfyUI.",
            inputs=[
                io.Clip.Input("clip", tooltip=clip_tooltip()),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt, any language. May be empty when an image is given."),
                io.Combo.Input("preset", options=PRESET_OPTIONS, default=PRESET_OPTIONS[0], tooltip=PRESET_TOOLTIP),
                image_resolution_input(),
                pad_rows_input(),
                io.Image.Input("image", optional=True,
                               tooltip=f"Optional images ({vision_names()} only); a batch is several images, in order, "
                                       "in one prompt."),
            ],
            outputs=[HIDDEN.Output(display_name="hidden",
                                   tooltip="MLLM hidden states [1, layers+1, tokens, width] for X2I AlignNet Project.")],
        )

    @classmethod
    def execute(cls, clip, text="", preset=PRESET_OPTIONS[0], image_resolution=0, image=None,
                pad_rows="reference") -> io.NodeOutput:
        if image is not None and (not isinstance(image, torch.Tensor) or image.dim() != 4):
            raise NodeError(f"{NODE}: 'image' must be a ComfyUI IMAGE batch [N, H, W, C]")
        if not (text or "").strip() and image is None:
            raise NodeError(f"{NODE}: the prompt is empty - type some text or connect an image")
        req = EncodeRequest(text=text if (text or "").strip() else None, images=image)
        return io.NodeOutput(encode_with_clip(clip, req, preset, image_resolution or None, pad_rows))


NODES = [X2ICLIPEncode]
