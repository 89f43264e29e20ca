"""MiniCPM-o-2.6 as the X2I MLLM - only behind the explicit 'trust remote code' switch.

MiniCPM-o is not part of transformers: its folder ships Python files
(``modeling_minicpmo.py``, ``processing_minicpmo.py`` ...) that transformers
imports and runs when ``trust_remote_code=True``.  That code runs with your
rights, so :func:`x2i_core.mllm.load_mllm` refuses the folder unless the switch
is on, and nothing in the folder is imported before that check.

Encoding reproduces the reference's MiniCPM-o recipe: one user message whose
content is ``(<image>./</image>)`` per image and per video frame, then
``(<audio>./</audio>)`` per audio clip (16 kHz mono), then the text; the
tokenizer's chat template with generation prompt; the folder's processor with
one slice per image; the model's own ``generate(max_new_tokens=1)`` and its
prefill hidden states (all layers of ``llm``), unpadded.  The prompt presets do
not apply (the released MiniCPM-o AlignNet was used this way); the preset is
reported as ``minicpm``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..audio import prepare_audio
from ..errors import X2IInputError
from ..media import as_video_list, to_pil_list
from ..prompt import VISION_PLACEHOLDERS
from .base import EncodeRequest, HiddenStates
from .cache import FORWARD_CALLS
from .chat import ChatEncoder, _as_list

IMAGE_TAG = "(<image>./</image>)\n"
AUDIO_TAG = "(<audio>./</audio>)\n"
MAX_FRAMES = 64  # the reference's cap for video frames


class MiniCPMOEncoder(ChatEncoder):
    family = "minicpm-o"
    display = "MiniCPM-o"
    model_types = ("minicpmo",)
    modalities = frozenset({"text", "image", "video", "audio"})
    trust_remote_code = True
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
        found = [t for t in (*VISION_PLACEHOLDERS, *self.placeholders) if t in text]
        if found:
            raise X2IInputError(f"prompt text contains the MLLM's media placeholder(s) {found}; they are inserted "
                                "for connected media automatically - remove them from the text")
        if not text and not images and not audios:
            raise X2IInputError("prompt is empty: give text, an image, a video or audio")
        content = IMAGE_TAG * len(images) + AUDIO_TAG * len(audios) + text
        return content, images, audios

    def encode(self, requests: EncodeRequest | Sequence[EncodeRequest], preset: str | None = None,
               image_size: int | None = None, video_size: int | None = None, exact_fill: bool = True,
               prefill=None) -> HiddenStates:
        if prefill not in (None, "off", "dense"):
            raise X2IInputError("sparse prefill runs inside transformers' attention of the supported families; "
                                "MiniCPM-o's remote code is run as shipped - use prefill 'off'")
        if isinstance(requests, EncodeRequest):
            requests = [requests]
        if len(requests) != 1:
            raise X2IInputError("MiniCPM-o encodes one prompt at a time (the reference recipe is unpadded)")
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
