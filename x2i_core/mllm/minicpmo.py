"""MiniCPM-o-2.6 as the X2I MLLM - read from its files by default, its own remote code only when asked.

Loading (:meth:`MiniCPMOEncoder.load_parts`):

* by default the folder is read, never run: ``config.json`` as JSON, the ``*.safetensors`` weights, the tokenizer
  and ``preprocessor_config.json`` (see :mod:`.minicpmo_native`, which builds the model from transformers'
  Qwen2 decoder plus our NaViT-SigLIP, resampler and Whisper modules).  No ``.py`` file of the folder is
  imported, so this works on every transformers the pack supports;
* with ``trust_remote_code=True`` the folder's own ``modeling_minicpmo.py`` & co. are imported and run
  (processor first: a function-level import of the model code needs the processor's modules in transformers'
  cache).  That code was written for transformers 4.48; where it does not import, the error names the module
  and the import and points back to the default path.

Two prompt recipes, chosen by the preset:

* ``None`` / ``"auto"`` / ``"comfyui"`` / ``"scripts"`` / ``"minicpm"`` - the reference's *inference* recipe
  (reported as preset ``minicpm``): one user message whose content is ``(<image>./</image>)`` per image and per
  video frame, then ``(<audio>./</audio>)`` per audio clip (16 kHz mono), then the text; the tokenizer's chat
  template with generation prompt; one slice per image, chunked audio; the prefill hidden states of all layers
  of ``llm``, unpadded.  The Qwen-style prompt presets do not apply here.
* ``"training"`` - the reference's *training* recipe (its MiniCPM-o data module), text only: the caption goes
  into the instruction dict ``{'Text input': ..., 'Instruction editing description': 'no', 'image input':
  'no'}`` (the middle field takes the request's instruction when given), whose ``str()`` is the single user
  message under the chat template with generation prompt.  The processor gets the trainer's arguments
  (``padding="max_length"``, ``max_length=512``, ``add_special_tokens=True``): in MiniCPM-o's processor
  ``padding`` reaches ``tokenizer.encode()`` without a length, so the ids are padded to the tokenizer's
  ``model_max_length`` on its padding side, and ``max_length`` only cuts them to 512 afterwards; the mask marks
  every position real (pads included).  That is what the released AlignNet saw in training.

Fidelity: ``tests/test_minicpmo_oracle.py`` runs the reference repository's own MiniCPM-o code on transformers
4.48 (the stack it trained on) and compares both recipes with this encoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..audio import prepare_audio
from ..errors import X2IFileError, X2IInputError, X2IShapeError
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
    video_decode_fit = False  # each frame is resized as an image, from the full frame (the reference's way)
    max_audio_seconds = 300.0

    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
        if kwargs.get("quantization_config") is not None and not trust_remote_code:
            raise X2IInputError("bitsandbytes quantisation (bnb8 / bnb4) is not available for MiniCPM-o; use "
                                "quantization 'int8' or 'none'")
        if not trust_remote_code:
            from .minicpmo_native import MiniCPMOFilesProcessor, MiniCPMOFromFiles

            processor = MiniCPMOFilesProcessor.from_folder(path)  # the cheaper checks first
            model = MiniCPMOFromFiles.from_folder(path, torch_dtype)
            return model, model, processor
        return _load_remote_code(path, torch_dtype, **kwargs)

    @property
    def from_files(self) -> bool:
        """True when the model was read from its files (no remote code)."""
        from .minicpmo_native import MiniCPMOFromFiles

        return isinstance(self.model, MiniCPMOFromFiles)

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
        prompt = self.training_prompt(req)
        if self.from_files:
            inputs = self.processor(prompt, max_length=512, pad_to_model_max=True)
        else:  # the reference trainer's processor arguments
            inputs = self.processor([prompt], images=None, audios=None, max_slice_nums=1, use_image_id=False,
                                    chunk_input=True, return_tensors="pt", padding="max_length", max_length=512,
                                    sampling_rate=16000, add_special_tokens=True)
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                      "pixel_values": [[]] * inputs["input_ids"].shape[0]}
        mask = inputs["attention_mask"].detach().to("cpu", torch.long)
        hidden = self._prefill(inputs)
        if hidden.shape[0] != mask.shape[0] or hidden.shape[2] != mask.shape[1]:
            raise X2IShapeError(f"MiniCPM-o returned prefill states for {hidden.shape[2]} tokens, but its "
                                f"processor returned {mask.shape[1]} ({self.name}'s remote code behaves differently "
                                "from the reference's)")
        return HiddenStates(hidden, mask, self.name, "training", [int(mask.sum())], self.family)

    def _prefill(self, inputs: dict) -> torch.Tensor:
        """The prefill pass over a prepared prompt -> ``[B, layers + 1, S, H]``.  The reference calls
        ``generate`` (the trainer with max_new_tokens=2048) and keeps ``hidden_states[0]``, the prefill pass
        over the prompt: the tokens generated after it never reach those states, so one step is enough."""
        FORWARD_CALLS[self.name] += 1
        if self.from_files:
            with torch.inference_mode():
                return self.model.prefill(inputs)
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, tokenizer=self.processor.tokenizer, max_new_tokens=1,
                                      decode_text=False)
        states = getattr(out, "hidden_states", None)
        if not states or states[0] is None or any(s is None for s in states[0]):
            raise X2IShapeError(f"{self.name}: the folder's remote code returned no hidden states from generate (its "
                                "prepare_inputs_for_generation drops output_hidden_states on this transformers); "
                                "switch trust_remote_code off to read the folder's files instead")
        return torch.stack(tuple(states[0]), dim=1)

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
            raise X2IInputError("sparse prefill is not available for MiniCPM-o (its prompts are encoded as the "
                                "reference did, unpadded) - use prefill 'off'")
        if isinstance(requests, EncodeRequest):
            requests = [requests]
        if len(requests) != 1:
            raise X2IInputError("MiniCPM-o encodes one prompt at a time (the reference recipe is unpadded)")
        if recipe == "training":
            if pad_rows not in (None, "reference"):
                raise X2IInputError(f"pad_rows {pad_rows!r} is not available with MiniCPM-o: the training recipe's "
                                    "rows are the reference's (every position real); use pad_rows 'reference'")
            return self._encode_training(requests[0])
        content, images, audios = self._content(requests[0], video_size)
        tok = self.processor.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
        clips = [np.asarray(a) for a in audios]
        if self.from_files:
            inputs = self.processor(prompt, images, clips, max_length=32768)
        else:  # the reference inference script's processor arguments
            inputs = self.processor(text=[prompt], images=[images] if images else None,
                                    audios=[clips] if audios else None, max_slice_nums=1, use_image_id=False,
                                    chunk_input=True, return_tensors="pt", max_length=32768, sampling_rate=16000,
                                    add_special_tokens=True)
            inputs = {k: v for k, v in dict(inputs).items() if k != "image_sizes"}
        hidden = self._prefill(inputs)
        n = hidden.shape[2]
        return HiddenStates(hidden, torch.ones(1, n, dtype=torch.long), self.name, "minicpm", [n], self.family)

    def generate_answer(self, request, **kwargs):
        raise X2IInputError("reasoning -> image is supported with Qwen2.5-VL, Qwen2.5-Omni and InternVL; X2I reads "
                            "MiniCPM-o's prompt states only (its answers come from its own chat API)")


def _load_remote_code(path: str, torch_dtype: torch.dtype, **kwargs):
    """The folder's own code (trust_remote_code), processor first; an import that fails is named."""
    from transformers import AutoModel, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype, init_vision=True,
                                          init_audio=True, init_tts=False, **kwargs)
    except (ImportError, FileNotFoundError, NameError, AttributeError) as exc:
        raise X2IFileError(_remote_import_error(path, exc)) from exc
    return model, model, processor


def _remote_import_error(path: str, exc: BaseException) -> str:
    """Which of the folder's modules failed to import, and what it imported."""
    import re
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "transformers_modules" in f.filename or os.path.dirname(os.path.abspath(f.filename)) ==
              os.path.abspath(path)]
    where = f"{os.path.basename(frames[-1].filename)} line {frames[-1].lineno} ({frames[-1].line})" if frames else ""
    text = str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        what = f"no module named {exc.name!r}"
    elif isinstance(exc, ImportError) and exc.name and "cannot import name" not in text:
        what = f"cannot import name {exc.name!r}"
    else:
        what = text
    missing = re.search(r"not found in your environment: ([\w\-, .]+?)\. Run", text)
    if not where and missing:  # transformers' own check of the files' imports, before it runs them
        where = _importing_file(path, [m.strip() for m in missing.group(1).split(",")])
    return (f"MLLM folder '{path}': its remote code does not run on transformers {_tf_version()}: "
            f"{where or 'the folder' + chr(39) + 's Python code'} failed - {type(exc).__name__}: {what}. That code "
            "was written for transformers 4.48. Switch trust_remote_code off: X2I then reads the folder's config, "
            "tokenizer and safetensors weights without running its code")


def _importing_file(path: str, packages: list[str]) -> str:
    """``"modeling_minicpmo.py line 20 (import soundfile as sf)"``: the folder's first import of ``packages``."""
    import re

    pattern = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(re.escape(p) for p in packages) + r")\b")
    for name in sorted(n for n in os.listdir(path) if n.endswith(".py")):
        with open(os.path.join(path, name), encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if pattern.match(line):
                    return f"{name} line {lineno} ({line.strip()})"
    return ""


def _tf_version() -> str:
    import transformers

    return transformers.__version__
