"""Qwen2.5-VL (3B / 7B Instruct) as the X2I MLLM.

Encoding is one forward pass of the multimodal backbone (vision tower + text
decoder) with every hidden state returned and no LM head: the embedding output
plus each decoder layer (the last one after the final norm, as transformers
returns it), stacked as ``[B, layers + 1, S, H]``.  The reference obtains the
same tensors from the prefill step of ``generate(max_new_tokens=1)``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch

from ..errors import X2IFileError, X2IInputError
from ..media import as_video_list, to_pil_list
from ..prompt import build_message, resolve_preset, target_length, with_image_size
from .base import EncodeRequest, HiddenStates

log = logging.getLogger("x2i")

MODEL_TYPE = "qwen2_5_vl"


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise X2IFileError(
            f"MLLM folder '{path}' does not exist; expected a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer and preprocessor files)"
        )
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise X2IFileError(f"MLLM folder '{path}' has no config.json; expected a Hugging Face model folder")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise X2IFileError(f"MLLM config '{cfg_path}' is not valid JSON ({exc})") from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise X2IInputError(f"dtype {dtype!r} is unknown; expected auto, fp32, bf16 or fp16")
    return table[name]


class Qwen25VLEncoder:
    """Loads a Qwen2.5-VL model folder and encodes X2I prompts."""

    family = "qwen2.5-vl"

    def __init__(self, model, processor, name: str, path: str | None = None):
        self.model = model          # Qwen2_5_VLModel (backbone, no LM head)
        self.processor = processor
        self.name = name
        self.path = path
        text_cfg = getattr(model.config, "text_config", model.config)
        self.channels = int(text_cfg.num_hidden_layers) + 1
        self.hidden_size = int(text_cfg.hidden_size)

    # -- loading ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto",
                        device: str | torch.device = "cpu") -> "Qwen25VLEncoder":
        path = os.fspath(path)
        cfg = read_model_config(path)
        if cfg.get("model_type") != MODEL_TYPE:
            raise X2IFileError(
                f"MLLM folder '{path}' holds a {cfg.get('model_type')!r} model; this encoder reads "
                f"Qwen2.5-VL folders (model_type {MODEL_TYPE!r})"
            )
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        try:
            full = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
            processor = AutoProcessor.from_pretrained(path)
        except OSError as exc:
            raise X2IFileError(f"MLLM folder '{path}' is incomplete or corrupt ({exc})") from exc
        backbone = full.model
        del full  # drops the LM head: X2I never needs logits
        backbone.to(device).eval().requires_grad_(False)
        name = f"Qwen2.5-VL ({os.path.basename(os.path.normpath(path))})"
        return cls(backbone, processor, name, path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- encoding -----------------------------------------------------------
    def prepare(self, requests: Sequence[EncodeRequest], preset: str | None = None,
                image_size: int | None = None) -> tuple[dict[str, torch.Tensor], str, list[int]]:
        """Processor inputs for a batch, padded per the preset (no forward pass)."""
        if not requests:
            raise X2IInputError("no prompt given; expected at least one text/image/video prompt")
        tok = self.processor.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        per_prompt = []
        spec = None
        for i, req in enumerate(requests):
            images = to_pil_list(req.images, "image")
            videos = as_video_list(req.videos)
            s = with_image_size(resolve_preset(preset, bool(images or videos)), image_size)
            if spec is not None and s != spec:
                raise X2IInputError(
                    "a batch mixes text-only prompts and prompts with media under preset 'auto'; "
                    "choose one preset explicitly ('comfyui' or 'scripts') for the whole batch"
                )
            spec = s
            if req.text is not None and not isinstance(req.text, str):
                raise X2IInputError(f"prompt {i + 1}: text must be a string, found {type(req.text).__name__}")
            built = build_message(req.text, images, videos, spec, self.processor)
            enc = self.processor(
                text=[built.text],
                images=built.images or None,
                videos=built.videos or None,
                padding=False,
                return_tensors="pt",
            )
            per_prompt.append(enc)
        lengths = [int(e["input_ids"].shape[1]) for e in per_prompt]
        target = max(target_length(spec, n) for n in lengths)
        media_ids = {getattr(self.model.config, "image_token_id", None), getattr(self.model.config, "video_token_id", None)}
        media_ids.discard(None)
        ids_rows, mask_rows = [], []
        for i, (enc, n) in enumerate(zip(per_prompt, lengths)):
            ids = enc["input_ids"][0]
            if n > target:
                kept = ids[:target]
                if any(int((ids == m).sum()) != int((kept == m).sum()) for m in media_ids):
                    raise X2IInputError(
                        f"prompt {i + 1} is {n} tokens with its images/video, more than the '{spec.name}' preset's "
                        f"fixed {target}; use the 'comfyui' preset (its length grows with the prompt), "
                        "fewer or smaller images, or shorter text"
                    )
                log.warning("prompt %d is %d tokens; truncated to %d as the '%s' preset does", i + 1, n, target, spec.name)
                ids = kept
            pad = torch.full((target - ids.shape[0],), pad_id, dtype=ids.dtype)
            mask = torch.ones(ids.shape[0], dtype=torch.long)
            zeros = torch.zeros(pad.shape[0], dtype=torch.long)
            if spec.padding_side == "left":
                ids_rows.append(torch.cat([pad, ids]))
                mask_rows.append(torch.cat([zeros, mask]))
            else:
                ids_rows.append(torch.cat([ids, pad]))
                mask_rows.append(torch.cat([mask, zeros]))
        batch: dict[str, torch.Tensor] = {
            "input_ids": torch.stack(ids_rows),
            "attention_mask": torch.stack(mask_rows),
        }
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [e[key] for e in per_prompt if key in e and e[key] is not None]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        spgt = [e["second_per_grid_ts"] for e in per_prompt if "second_per_grid_ts" in e]
        if spgt:
            batch["second_per_grid_ts"] = torch.cat([torch.as_tensor(x, dtype=torch.float32).reshape(-1) for x in spgt])
        return batch, spec.name, lengths

    def forward_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward pass over prepared inputs -> ``[B, layers + 1, S, H]``."""
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        inputs = {}
        for k, v in batch.items():
            v = v.to(dev)
            if k.startswith("pixel_values"):
                v = v.to(dtype)
            inputs[k] = v
        with torch.no_grad():
            out = self.model(**inputs, use_cache=False, output_hidden_states=True, return_dict=True)
        return torch.stack(out.hidden_states, dim=1)

    def encode(self, requests: EncodeRequest | Sequence[EncodeRequest], preset: str | None = None,
               image_size: int | None = None) -> HiddenStates:
        """Encode prompts.  ``image_size`` overrides the preset's image resolution (pixels per side)."""
        if isinstance(requests, EncodeRequest):
            requests = [requests]
        batch, preset_name, lengths = self.prepare(list(requests), preset, image_size)
        hidden = self.forward_hidden(batch)
        return HiddenStates(hidden, batch["attention_mask"], self.name, preset_name, lengths)

    def encode_text(self, text: str | Sequence[str], preset: str | None = None) -> HiddenStates:
        texts = [text] if isinstance(text, str) else list(text)
        return self.encode([EncodeRequest(text=t) for t in texts], preset)
