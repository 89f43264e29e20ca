"""MiniCPM-o-2.6 as the X2I MLLM - only behind the explicit 'trust remote code' switch.

MiniCPM-o is not part of transformers: its folder ships Python files
(``modeling_minicpmo.py``, ``processing_minicpmo.py`` ...) that transformers
imports and runs when ``trust_remote_code=True``.  That code runs with your
rights, so :func:`x2i_core.mllm.load_mllm` refuses the folder unless the switch
is on, and nothing in the folder is imported before that check.

Two prompt recipes, chosen by the preset:

* ``None`` / ``"auto"`` / ``"comfyui"`` / ``"scripts"`` / ``"minicpm"`` - the
  reference's *inference* recipe (reported as preset ``minicpm``): one user
  message whose content is ``(<image>./</image>)`` per image and per video
  frame, then ``(<audio>./</audio>)`` per audio clip (16 kHz mono), then the
  text; the tokenizer's chat template with generation prompt; the folder's
  processor with one slice per image; the model's own
  ``generate(max_new_tokens=1)`` and its prefill hidden states (all layers of
  ``llm``), unpadded.  The Qwen-style prompt presets do not apply here.
* ``"training"`` - the reference's *training* recipe (its MiniCPM-o data
  module), text only: the caption goes into the instruction dict
  ``{'Text input': ..., 'Instruction editing description': 'no', 'image input':
  'no'}`` (the middle field takes the request's instruction when given), whose
  ``str()`` is the single user message under the chat template with generation
  prompt.  That prompt goes to the folder's processor with the trainer's exact
  arguments (``padding="max_length"``, ``max_length=512``, one slice,
  ``use_image_id=False``, ``chunk_input=True``, ``add_special_tokens=True``, no
  images, no audio), and the model's ``generate`` gets the returned ids and
  mask plus one empty image list per row, as the trainer calls it.  The
  returned attention mask is the mask we report.

Why we hand the padding to the folder's processor instead of padding ourselves:
in MiniCPM-o's processor the leftover keyword arguments (``padding``,
``add_special_tokens``) are forwarded to ``tokenizer.encode()``, while
``max_length`` is not - it only cuts the encoded ids afterwards.  So the
padding length and side come from the folder's tokenizer settings
(``model_max_length``, ``padding_side``), and the mask the processor builds
marks only its own batch padding (for one caption: every position).  With the
released MiniCPM-o-2.6 folder that is what the released AlignNet saw in
training (the trainer's buffers are 512 tokens long); calling the folder's
processor with the reference's arguments reproduces it by construction, where
padding the ids ourselves would only reproduce our guess of it.

Limits of what is tested: the MiniCPM-o code is remote code shipped in the
model folder (the reference trainer imports its own copy of it), and the folder
- its tokenizer files and weights - cannot be fetched here, so no
reference-stack oracle runs it.  The tests use a small stand-in folder with
the same public interface: they prove the calls we make (prompt text,
processor arguments, ``generate`` arguments) and the stacking of the prefill
hidden states - not MiniCPM-o's own code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..audio import prepare_audio
from ..errors import X2IInputError, X2IShapeError
from ..media import as_video_list, to_pil_list
from ..prompt import VISION_PLACEHOLDERS, _check_has_words
from .base import EncodeRequest, HiddenStates
from .cache import FORWARD_CALLS
from .chat import ChatEncoder, check_pad_rows
from .prompting import _as_list

IMAGE_TAG = "(<image>./</image>)\n"
AUDIO_TAG = "(<audio>./</audio>)\n"
MAX_FRAMES = 64  # the reference's cap for video frames

INFERENCE_PRESETS = ("auto", "comfyui", "scripts", "minicpm")  # and None: the reference's inference recipe
PRESETS = (*INFERENCE_PRESETS, "training")



def recipe_of(preset: str | None) -> str:
    """``"minicpm"`` (the inference recipe) or ``"training"``; unknown names are refused."""
    if preset is None:
        return "minicpm"
    name = preset.lower() if isinstance(preset, str) else preset
    if name == "training":
        return "training"
    if name in INFERENCE_PRESETS:
        return "minicpm"
    raise X2IInputError(f"prompt preset {preset!r} is unknown for MiniCPM-o; expected one of {list(PRESETS)} "
                        "('training' = the reference's training recipe, text only; the others = its inference "
                        "recipe)")


class MiniCPMOEncoder(ChatEncoder, family="minicpm-o"):  # facts: x2i_core.registry
    placeholders = ("<image>", "</image>", "<audio>", "</audio>")
    max_audio_seconds = 300.0

    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
        if not trust_remote_code:  # load_mllm checks first; this guards direct use of the class
            raise X2IInputError("MiniCPM-o needs trust_remote_code=True (it runs Python shipped in the model folder)")
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype, init_vision=True,
                                          init_audio=True, init_tts=False, **kwargs)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        return model, model, processor

    def text_config(self):
        return self.model.llm.config

    @property
    def decoder_layers(self):
        return self.model.llm.model.layers

    def audio_rate(self) -> int:
        return 16000

    def _refuse_placeholders(self, text: str | None) -> None:
        found = [t for t in (*VISION_PLACEHOLDERS, *self.placeholders) if text and t in text]
        if found:
            raise X2IInputError(f"prompt text contains the MLLM's media placeholder(s) {found}; they are inserted "
                                "for connected media automatically - remove them from the text")

    def _content(self, req: EncodeRequest, video_size: int | None) -> tuple[str, list, list]:
        if req.history:
            raise X2IInputError("MiniCPM-o encoding follows the reference's single-message recipe; multi-turn chats "
                                "are supported with Qwen2.5-VL, Qwen2.5-Omni and InternVL")
        images = to_pil_list(req.images, "image")
        for vi, video in enumerate(as_video_list(req.videos)):
            frames = to_pil_list(video, f"video {vi + 1} frame")
            if len(frames) > MAX_FRAMES:
                step = len(frames) / MAX_FRAMES
                frames = [frames[int(i * step + step / 2)] for i in range(MAX_FRAMES)]
            images.extend(frames)
        audios = [prepare_audio(a, 16000, f"audio {j + 1}", self.max_audio_seconds)
                  for j, a in enumerate(_as_list(req.audios))]
        text = req.text if req.text is not None else ""
        if req.instruction:
            text = f"{text}\n{req.instruction}" if text else req.instruction
        self._refuse_placeholders(text)
        if not text and not images and not audios:
            raise X2IInputError("prompt is empty: give text, an image, a video or audio")
        content = IMAGE_TAG * len(images) + AUDIO_TAG * len(audios) + text
        return content, images, audios

    def training_prompt(self, req: EncodeRequest) -> str:
        """The chat-templated prompt of the reference's training recipe (text only)."""
        if req.history:
            raise X2IInputError("MiniCPM-o preset 'training' encodes one caption, as the reference trainer did; "
                                "multi-turn chats are not part of it (and MiniCPM-o takes no chats in X2I)")
        media = [what for what, items in (("images", to_pil_list(req.images, "image")),
                                          ("video", as_video_list(req.videos)), ("audio", _as_list(req.audios)))
                 if items]
        if media:
            raise X2IInputError(f"MiniCPM-o preset 'training' is text-only (the AlignNet was trained on captions), "
                                f"but {' and '.join(media)} were given; use the default preset ('auto') for "
                                "prompts with media")
        text = req.text
        if text is not None and not isinstance(text, str):
            raise X2IInputError(f"prompt text must be a string, found {type(text).__name__}")
        if not text:
            raise X2IInputError("prompt text is empty; the 'training' preset needs a caption")
        self._refuse_placeholders(text)
        self._refuse_placeholders(req.instruction)
        _check_has_words(text, self.processor)
        fields = {"Text input": text, "Instruction editing description": req.instruction or "no",
                  "image input": "no"}
        return self.processor.tokenizer.apply_chat_template([{"role": "user", "content": str(fields)}],
                                                            tokenize=False, add_generation_prompt=True)

    def _encode_training(self, req: EncodeRequest) -> HiddenStates:
        tok = self.processor.tokenizer
        prompt = self.training_prompt(req)
        # The folder's processor pads (see the module docstring): its output is what the AlignNet saw.
        inputs = self.processor([prompt], images=None, audios=None, max_slice_nums=1, use_image_id=False,
                                chunk_input=True, return_tensors="pt", padding="max_length", max_length=512,
                                sampling_rate=16000, add_special_tokens=True)  # the reference trainer's arguments
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        FORWARD_CALLS[self.name] += 1
        with torch.inference_mode():
            # The reference trainer asks for max_new_tokens=2048 but keeps only hidden_states[0], the prefill
            # pass over the prompt; the tokens generated after it never reach those states, so one is enough.
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      pixel_values=[[]] * ids.shape[0], tokenizer=tok, max_new_tokens=1,
                                      decode_text=False)
        hidden = torch.stack(tuple(out.hidden_states[0]), dim=1)
        mask = mask.detach().to("cpu", torch.long)
        if hidden.shape[0] != mask.shape[0] or hidden.shape[2] != mask.shape[1]:
            raise X2IShapeError(f"MiniCPM-o's generate returned prefill states for {hidden.shape[2]} tokens, but its "
                                f"processor returned {mask.shape[1]} ({self.name}'s remote code behaves differently "
                                "from the reference's)")
        return HiddenStates(hidden, mask, self.name, "training", [int(mask.sum())], self.family)

    def encode(self, requests: EncodeRequest | Sequence[EncodeRequest], preset: str | None = None,
               image_size: int | None = None, video_size: int | None = None, exact_fill: bool = True,
               prefill=None, pad_rows: str | None = None) -> HiddenStates:
        """One prompt through MiniCPM-o's own code (see the module docstring for the two recipes).
        ``pad_rows`` is accepted for the common interface: the inference recipe has no padding and the
        training recipe's rows are whatever the model's own code computes (the reference's), so only
        ``"reference"`` (or None) is meaningful with 'training'."""
        recipe = recipe_of(preset)
        if pad_rows is not None:
            check_pad_rows(pad_rows)
        if prefill not in (None, "off", "dense"):
            raise X2IInputError("sparse prefill runs inside transformers' attention of the supported families; "
                                "MiniCPM-o's remote code is run as shipped - use prefill 'off'")
        if isinstance(requests, EncodeRequest):
            requests = [requests]
        if len(requests) != 1:
            raise X2IInputError("MiniCPM-o encodes one prompt at a time (the reference recipe is unpadded)")
        if recipe == "training":
            if pad_rows not in (None, "reference"):
                raise X2IInputError(f"pad_rows {pad_rows!r} is not available with MiniCPM-o: its remote code computes "
                                    "every row as shipped (the reference's rows); use pad_rows 'reference'")
            return self._encode_training(requests[0])
        content, images, audios = self._content(requests[0], video_size)
        tok = self.processor.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=[images] if images else None,
                                audios=[[np.asarray(a) for a in audios]] if audios else None, max_slice_nums=1,
                                use_image_id=False, chunk_input=True, return_tensors="pt", max_length=32768,
                                sampling_rate=16000)
        inputs = {k: v for k, v in dict(inputs).items() if k != "image_sizes"}
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        FORWARD_CALLS[self.name] += 1
        with torch.inference_mode():
            out = self.model.generate(**inputs, tokenizer=tok, max_new_tokens=1, decode_text=False)
        hidden = torch.stack(tuple(out.hidden_states[0]), dim=1)
        n = hidden.shape[2]
        return HiddenStates(hidden, torch.ones(1, n, dtype=torch.long), self.name, "minicpm", [n], self.family)

    def generate_answer(self, request, **kwargs):
        raise X2IInputError("reasoning -> image is supported with Qwen2.5-VL, Qwen2.5-Omni and InternVL; MiniCPM-o's "
                            "remote code has its own chat API")
