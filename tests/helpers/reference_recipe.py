"""A straightforward computation of the reference X2I encoding on *this* environment's transformers.

Written from the reference notes, deliberately without x2i_core's prompt,
media or padding code: it calls the Hugging Face processor with padding /
truncation arguments exactly as the reference does and takes the prefill
hidden states of ``generate(max_new_tokens=1, output_hidden_states=True)``.

It runs on our stack (transformers 4.57), so it cannot see where that stack differs from the one the
released AlignNets were computed with: left-pad rows here are 4.57's prompt-independent constant (compare
with ``pad_rows="constant"``), and the processor's behaviour is 4.57's.  What the reference stack itself
computes is checked by ``tests/test_reference_oracle.py`` (transformers 4.49 in a subprocess).  Like the
reference, no ``fps`` goes to the processor (frames are sampled at 1 fps before) and no vision ids are
written (4.49 never passed ``add_vision_id`` to the template).
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
    """Video frames as qwen-vl-utils 0.0.10's ``fetch_video`` prepares a decoded clip (written from its
    source, with torchvision's tensor resize): one size from smart-resize with the video floor
    128*28*28 and the ceiling ``min(max_pixels, max(min(768*28*28, 0.9*128000*28*28 / T * 2), 1.05 x floor))``,
    bicubic with antialiasing, back to uint8; an odd count gets its last frame repeated."""
    import numpy as np
    from torchvision.transforms import InterpolationMode, functional as TF

    video = torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in frames])).permute(0, 3, 1, 2)
    n, _, h, w = video.shape
    floor_px = 128 * 28 * 28
    ceiling = min(max_pixels, max(min(768 * 28 * 28, int(128000 * 28 * 28 * 0.9) / n * 2), int(floor_px * 1.05)))
    hb, wb = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
    if hb * wb > ceiling:
        beta = math.sqrt(h * w / ceiling)
        hb, wb = math.floor(h / beta / 28) * 28, math.floor(w / beta / 28) * 28
    elif hb * wb < floor_px:
        beta = math.sqrt(floor_px / (h * w))
        hb, wb = math.ceil(h * beta / 28) * 28, math.ceil(w * beta / 28) * 28
    video = TF.resize(video, [hb, wb], interpolation=InterpolationMode.BICUBIC, antialias=True)
    out = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in video]
    if len(out) % 2:
        out.append(out[-1])
    return out


def reference_inputs(processor, preset: str, text: str | None, images=()):
    images = [im.convert("RGB") for im in images]
    tok = processor.tokenizer
    if preset == "training":
        assert not images
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
        vids = None  # video: tests/test_reference_oracle.py (qwen-vl-utils' own frame handling)
        has_media = bool(images)
        content.append({"type": "text", "text": str({
            "Text input": "" if text is None else text, "Instruction editing description": "",
            "image input": "no" if not has_media else "yes"})})
        message = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        imgs = [c["image"] for c in content if c["type"] == "image"] or None
        tok.padding_side = "right"
        first = processor(text=[prompt], images=imgs, videos=vids, return_tensors="pt")
        max_len = max(int(first.input_ids.shape[1] * 1.3), 512)
        return processor(text=[prompt], images=imgs, videos=vids, padding="max_length", max_length=max_len,
                         return_tensors="pt")
    if preset == "scripts":
        content, image_list = [], []
        for im in images:
            small = im.resize((128, 128))
            content.append({"type": "image", "image": small})
            image_list.append(small)
        vids = None
        if text is not None:
            content.append({"type": "text", "text": text})
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        tok.padding_side = "right"
        return processor(text=[prompt], images=image_list or None, videos=vids, padding="max_length",
                         max_length=512, truncation=True, return_tensors="pt")
    raise ValueError(preset)


@torch.no_grad()
def reference_hidden(model, processor, preset: str, text: str | None, images=()) -> torch.Tensor:
    """``[1, layers + 1, S, H]`` via the reference's generate() call."""
    inputs = reference_inputs(processor, preset, text, images)
    out = model.generate(**inputs, max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True,
                         do_sample=False)
    return torch.stack(out["hidden_states"][0], dim=1)
