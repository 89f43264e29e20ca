"""Qwen2.5-Omni (3B / 7B) as the X2I MLLM: text, images, video and audio.

Only the *thinker* (vision + audio towers and the text decoder) is loaded -
never the talker or the token-to-wave model, which turn answers into speech.
A released Omni folder (``model_type`` ``qwen2_5_omni``) is read with audio
output off; a thinker-only folder (``qwen2_5_omni_thinker``) works as well.

Prompts carry Omni's default system message (its processor warns without it);
audio is mixed to mono, resampled to 16 kHz by :mod:`x2i_core.audio` and turned
into Whisper log-mel features by the folder's feature extractor, which reads at
most 30 s per clip.  Video frames are given at the sampled rate (1 fps by
default), which sets Omni's time positions.
"""

from __future__ import annotations

import contextlib

import torch

from .chat import ChatEncoder, read_model_config

OMNI_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                      "perceiving auditory and visual inputs, as well as generating text and speech.")


class _NoHead(torch.nn.Module):
    """Stands in for the LM head during encoding: X2I needs hidden states, not logits."""

    def forward(self, x):
        return x[..., :0]


class Qwen25OmniEncoder(ChatEncoder, family="qwen2.5-omni"):  # facts: x2i_core.registry
    system_prompt = OMNI_SYSTEM_PROMPT
    placeholders = ("<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>", "<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>",
                    "<|audio_eos|>")
    max_audio_seconds = 30.0  # the Whisper feature extractor's window
    left_pad_exact = True  # tests/test_family_omni.py checks the fill against the padded forward
    right_pad_rows_shared = True  # the same tests compare the right-padded presets with the padded forward

    @classmethod
    def load_parts(cls, path: str, torch_dtype: torch.dtype, **kwargs):
        from transformers import AutoProcessor, Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration

        if read_model_config(path).get("model_type") == "qwen2_5_omni":
            # The thinker alone, from the released folder: its weights are the 'thinker.' entries of the
            # safetensors (the prefix is the class's base_model_prefix).  The full Omni class is avoided on
            # purpose: it also builds the speech models and unpickles the folder's spk_dict.pt.
            config = Qwen2_5OmniConfig.from_pretrained(path).thinker_config
            thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, config=config,
                                                                                 dtype=torch_dtype, **kwargs)
        else:
            thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, **kwargs)
        processor = AutoProcessor.from_pretrained(path)
        return thinker, thinker, processor

    def text_config(self):
        return self.model.config.text_config

    @property
    def decoder_layers(self):
        inner = self.model.model  # the thinker's text decoder (transformers 5 nests it as .language_model)
        return getattr(inner, "layers", None) or inner.language_model.layers

    def chat_kwargs(self, spec):
        return {"add_vision_id": True} if spec.vision_ids else {}

    def media_token_ids(self) -> set[int]:
        cfg = self.model.config
        return {int(getattr(cfg, k)) for k in ("audio_token_index", "image_token_index", "video_token_index")
                if getattr(cfg, k, None) is not None}

    def processor_inputs(self, built):
        kwargs = {"text": [built.text], "padding": False, "return_tensors": "pt", "use_audio_in_video": False}
        if built.images:
            kwargs["images"] = built.images
        if built.videos:
            kwargs["videos"] = built.videos
            kwargs["fps"] = built.spec.video_fps
        if built.audios:
            kwargs["audio"] = built.audios
        return dict(self.processor(**kwargs))

    @contextlib.contextmanager
    def _without_head(self):
        head = self.model.lm_head
        self.model.lm_head = _NoHead()
        try:
            yield
        finally:
            self.model.lm_head = head

    def forward_hidden(self, batch, **options):
        with self._without_head():
            return super().forward_hidden(batch, **options)

    def forward_inputs(self, batch):
        self.model.rope_deltas = None  # stale deltas from an earlier call must not leak into this one
        return {}
