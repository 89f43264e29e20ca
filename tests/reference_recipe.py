"""An independent, straightforward computation of the reference X2I encoding.

Written from the reference notes, deliberately without x2i_core's prompt,
media or padding code: it calls the Hugging Face processor with padding /
truncation arguments exactly as the reference does and takes the prefill
hidden states of ``generate(max_new_tokens=1, output_hidden_states=True)``.
"""

from __future__ import annotations

import math

import torch
from PIL import Image


def _resize_budget(img: Image.Image, max_pixels: int, factor: int = 28, min_pixels: int = 4 * 28 * 28) -> Image.Image:
    h, w = img.height, img.width
    hb = max(factor, round(h / factor) * factor)
    wb = max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = math.floor(h / beta / factor) * factor
        wb = math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return img.resize((wb, hb))


def _frames(frames, max_pixels):
    out = [_resize_budget(f.convert("RGB"), max_pixels) for f in frames]
    if len(out) % 2:
        out.append(out[-1])
    return out


def reference_inputs(processor, preset: str, text: str | None, images=(), video=None):
    images = [im.convert("RGB") for im in images]
    tok = processor.tokenizer
    if preset == "training":
        assert not images and video is None
        message = [{"role": "user", "content": [{"type": "text", "text": str(
            {"Text input": text, "Instruction editing description": "no", "image input": "no"})}]}]
        prompt = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        tok.padding_side = "left"
        try:
            return processor(text=[prompt], images=None, videos=None, padding="max_length", max_length=512,
                             truncation=True, return_tensors="pt")
        finally:
            tok.padding_side = "right"
    if preset == "comfyui":
        content = [{"type": "image", "image": _resize_budget(im, 224 * 224)} for im in images]
        vids = None
        if video is not None:
            vids = [_frames(video, 128 * 128)]
            content.append({"type": "video", "video": vids[0]})
        has_media = bool(images) or video is not None
        content.append({"type": "text", "text": str({
            "Text input": "" if text is None else text, "Instruction editing description": "",
            "image input": "no" if not has_media else "yes"})})
        message = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True, add_vision_id=True)
        imgs = [c["image"] for c in content if c["type"] == "image"] or None
        tok.padding_side = "right"
        fps = {"fps": 1.0} if vids else {}  # frames sampled at 1 fps
        first = processor(text=[prompt], images=imgs, videos=vids, return_tensors="pt", **fps)
        max_len = max(int(first.input_ids.shape[1] * 1.3), 512)
        return processor(text=[prompt], images=imgs, videos=vids, padding="max_length", max_length=max_len,
                         return_tensors="pt", **fps)
    if preset == "scripts":
        content, image_list = [], []
        for im in images:
            small = im.resize((128, 128))
            content.append({"type": "image", "image": small})
            image_list.append(small)
        vids = None
        if video is not None:
            vids = [_frames(video, 128 * 128)]
            content.append({"type": "video", "video": vids[0]})
        if text is not None:
            content.append({"type": "text", "text": text})
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        tok.padding_side = "right"
        fps = {"fps": 1.0} if vids else {}
        return processor(text=[prompt], images=image_list or None, videos=vids, padding="max_length",
                         max_length=512, truncation=True, return_tensors="pt", **fps)
    raise ValueError(preset)


@torch.no_grad()
def reference_hidden(model, processor, preset: str, text: str | None, images=(), video=None) -> torch.Tensor:
    """``[1, layers + 1, S, H]`` via the reference's generate() call."""
    inputs = reference_inputs(processor, preset, text, images, video)
    out = model.generate(**inputs, max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True,
                         do_sample=False)
    return torch.stack(out["hidden_states"][0], dim=1)
