"""InternVL (2.5 / 3, the transformers ``-hf`` format) as the X2I MLLM: text, images and video.

The released X2I AlignNets for InternVL2.5-1B (C=25, H=896, the *scale* variant) and -4B (C=37, H=2048)
fit the text decoder of these models.  The original remote-code InternVL layout (``model_type``
``internvl_chat``, the folders those AlignNets were trained with) is converted once, without running
its code, by ``python -m x2i_core convert-internvl`` (:mod:`x2i_core.convert_internvl`).

The reference uses its own InternVL recipes, not the Qwen ones, and so do the presets here:

* ``training`` - what the AlignNets were distilled on: ``str()`` of the instruction dict
  (``'no'``, ``'no'``) tokenized as it is, **without** a chat template, right-padded to 512 with
  truncation.
* ``scripts`` - the reference inference script: the ``internvl2_5`` conversation (its own system
  message), the dict without the ``'image input'`` key, at most one image resized to 128x128 (one tile
  after the processor), ``<image>`` first; right-padded to 512 with truncation.
* ``comfyui`` - no InternVL recipe exists in the reference nodes: the Qwen-style dict in the folder's chat
  template, padded as the ``comfyui`` preset pads.

In every recipe the language model runs with positions ``0..S-1``, pads included: the reference calls
its decoder with ``inputs_embeds`` and the mask and no position ids (mask-derived positions, as
``generate()`` would make them, differ on every pad row).  Pad rows then differ from one another, so the
exact pad-row savings of the Qwen families do not apply: the padded batch runs as it is.
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from ..errors import X2IInputError
from ..media import as_video_list, to_pil_list
from ..prompt import SPECS, BuiltPrompt, _check_has_words, _check_placeholders, resolve_preset, with_image_size
from .chat import ChatEncoder, load_pil_processor
from .prompting import _as_list, _turns_of

# The system message of InternVL's ``internvl2_5`` conversation template, which the reference sets.
INTERNVL25_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                     "多模态大语言模型。")
IMAGE_TOKEN = "<IMG_CONTEXT>"   # the processor expands it to <img> + one context token per patch + </img>

# The InternVL recipes pad on the right (the tokenizer's side), to exactly 512, truncating.
RECIPE_SPECS = {
    "training": dataclasses.replace(SPECS["training"], padding_side="right"),
    "scripts": SPECS["scripts"],
}


def internvl25_prompt(question: str, system: str = INTERNVL25_SYSTEM) -> str:
    """One user question in the ``internvl2_5`` conversation format, with the assistant prompt open."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


class InternVLEncoder(ChatEncoder, family="internvl"):  # facts: x2i_core.registry
    placeholders = (IMAGE_TOKEN, "<img>", "</img>", "<video>")
    left_pad_exact = False  # no InternVL recipe pads on the left; positions 0..S-1 would differ per pad anyway
    right_pad_rows_shared = False  # positions 0..S-1: every right-pad row sits at its own position

    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, **kwargs):
        from transformers import InternVLForConditionalGeneration

        full = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, **kwargs)
        processor = load_pil_processor(path)
        return full, full.model, processor

    def media_token_ids(self) -> set[int]:
        return {int(self.model.config.image_token_id)}

    def image_tokens(self, width: int, height: int, spec) -> int:
        """At least one tile of ``image_seq_length`` tokens per image (more when the processor tiles it)."""
        return int(getattr(self.processor, "image_seq_length", 256))

    def video_tokens(self, frames: int, height: int, width: int, spec, fitted=None) -> int:
        return frames * self.image_tokens(width, height, spec)

    def build_prompt(self, req, preset, image_size, index: int = 0, video_size=None):
        turns = _turns_of(req)
        last = turns[-1]
        has_media = any(t.images is not None or t.videos is not None or t.audios is not None for t in turns)
        name = resolve_preset(preset, has_media).name
        if name not in RECIPE_SPECS:
            return super().build_prompt(req, preset, image_size, index, video_size)
        if len(turns) > 1:
            raise X2IInputError(f"prompt {index + 1}: InternVL's '{name}' recipe is one user message; use preset "
                                "'comfyui' for a multi-turn chat")
        images = to_pil_list(last.images, "image")
        if as_video_list(last.videos) or _as_list(last.audios):
            raise X2IInputError(f"prompt {index + 1}: InternVL's '{name}' recipe takes text and at most one image; "
                                "use preset 'comfyui' for video")
        if len(images) > 1:
            raise X2IInputError(f"prompt {index + 1}: {len(images)} images given; InternVL's '{name}' recipe takes "
                                "one (as the reference script); use preset 'comfyui' for several images")
        text = last.text
        if text is not None and not isinstance(text, str):
            raise X2IInputError(f"prompt {index + 1}: text must be a string, found {type(text).__name__}")
        spec = with_image_size(RECIPE_SPECS[name], image_size, video_size)
        _check_placeholders(text, spec, False, self.placeholders)
        _check_placeholders(last.instruction, spec, False, self.placeholders)
        if name == "training":
            if not text:
                raise X2IInputError("prompt text is empty; the 'training' preset needs a caption")
            _check_has_words(text, self.processor)
            prompt = str({"Text input": text, "Instruction editing description": last.instruction or "no",
                          "image input": "no"})
            return BuiltPrompt(prompt, [], [], spec, templated=False)
        if not images and not text and not last.instruction:
            raise X2IInputError("prompt is empty: give text or an image")
        if text and not images:
            _check_has_words(text, self.processor)
        question = str({"Text input": text, "Instruction editing description": last.instruction or "no"})
        if images:
            images = [images[0].resize(spec.image_exact_size, resample=Image.BICUBIC)]
            question = f"{IMAGE_TOKEN}\n{question}"
        return BuiltPrompt(internvl25_prompt(question), images, [], spec, templated=False)

    def processor_inputs(self, built):
        kwargs = {"text": [built.text], "padding": False, "return_tensors": "pt"}
        if built.images:
            kwargs["images"] = built.images
        if built.videos:
            kwargs["videos"] = built.videos
        return dict(self.processor(**kwargs))

    def forward_inputs(self, batch):
        ids = batch["input_ids"]
        return {"position_ids": torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)}
