"""Tiny random models of the other MLLM families, in the folder formats users download.

* ``build_qwen25omni`` - a Qwen2.5-Omni folder (``model_type`` ``qwen2_5_omni``:
  thinker + talker + token2wav configs, as released; the weights hold the
  thinker only, which is all X2I loads), 2 decoder layers of width 64, small
  vision and audio towers, a locally trained tokenizer with Omni's special
  tokens and a chat template in Omni's format, Whisper feature-extractor and
  Qwen2-VL image/video processor configs.
* ``build_internvl`` - an InternVL folder in the transformers (``-hf``) format
  (``model_type`` ``internvl``; Qwen2 text decoder, 2 layers of width 64; a
  1-layer InternViT at 28x28 pixels per tile), tokenizer with ``<img>``,
  ``</img>``, ``<IMG_CONTEXT>`` and InternVL's chat template.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch

from ..convert_internvl import chat_template
from ..mllm.qwen25omni import OMNI_SYSTEM_PROMPT
from .parts import _spread, _staging, build_tokenizer

OMNI_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>",
    "<|VIDEO|>",
]

# Qwen2.5-Omni's chat template format (system, media placeholders with bos/eos, generation prompt).
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + OMNI_SYSTEM_PROMPT +
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _omni_configs(tok, hidden: int, num_layers: int) -> tuple[dict, dict, dict]:
    """Tiny thinker (text 2 layers, vision and audio towers), talker and token2wav configs of Qwen2.5-Omni."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in OMNI_SPECIAL_TOKENS}
    heads, head_dim = 4, hidden // 4
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    thinker = dict(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         rope_scaling={"mrope_section": mrope, "rope_type": "default", "type": "default"},
                         tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                           out_hidden_size=hidden, tokens_per_second=2),
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=hidden, n_window=100, max_source_positions=1500),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        position_id_per_seconds=25, seconds_per_chunk=2, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    # The talker is never run (X2I loads the thinker only); its special ids are set inside its tiny vocabularies,
    # so that transformers 5 finds the config valid.
    talker = dict(vocab_size=64, embedding_size=hidden, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_scaling={"mrope_section": [4, 2, 2], "rope_type": "default", "type": "default"},
                  tts_text_start_token_id=50, tts_text_end_token_id=51, tts_text_pad_token_id=49,
                  tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=59,
                  tts_codec_mask_token_id=62, vision_start_token_id=40, vision_end_token_id=41,
                  audio_start_token_id=42, audio_end_token_id=43)
    token2wav = dict(dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                                     ff_mult=2, emb_dim=16, enc_dim=16, enc_emb_dim=16, enc_channels=[32, 32, 32, 32, 64],
                                     enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1],
                                     enc_attention_channels=16, enc_res2net_scale=2, enc_se_channels=16, mel_dim=8,
                                     num_embeds=64, repeats=2, block_size=8, look_ahead_layers=[0],
                                     look_backward_layers=[0]),
                     bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                                         resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2],
                                         upsample_kernel_sizes=[4]))
    return thinker, talker, token2wav


class _KnownOmniConfigNotes(logging.Filter):
    """transformers' own checks that fire on Qwen2.5-Omni's *published* config layout, whatever its sizes: 4.5x
    warns about the thinker's ``mrope_section`` (which the model needs), 5.x about the default talker ids (151 860,
    ...) of the talker config it builds first. A real Omni folder prints the same; the tiny factory keeps them
    out of ``make demo``."""

    def filter(self, record):
        msg = record.getMessage()
        return not (("Unrecognized keys" in msg and "mrope_section" in msg)
                    or "must be `None` or an integer within the vocabulary" in msg)


@contextlib.contextmanager
def _quiet_known_config_notes():
    note = _KnownOmniConfigNotes()
    handlers = [*logging.getLogger("transformers").handlers, *logging.getLogger().handlers]
    for h in handlers:
        h.addFilter(note)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(note)


def build_qwen25omni(out_dir: str, seed: int = 0, num_layers: int = 2, hidden: int = 64) -> str:
    with _quiet_known_config_notes():
        return _build_qwen25omni(out_dir, seed, num_layers, hidden)


def _build_qwen25omni(out_dir: str, seed: int, num_layers: int, hidden: int) -> str:
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        WhisperFeatureExtractor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = build_tokenizer(out_dir, special_tokens=OMNI_SPECIAL_TOKENS, chat_template=OMNI_CHAT_TEMPLATE,
                          extra_special_tokens={
                              "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"})
    thinker, talker, token2wav = _omni_configs(tok, hidden, num_layers)
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav,
                               enable_audio_output=False)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    _spread(model, seed)
    config.enable_audio_output = True  # as released; X2I loads it with audio output off (thinker only)
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
                                              temporal_patch_size=2, merge_size=2),
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 768, patch_size=14,
                                              temporal_patch_size=2, merge_size=2),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                                  chunk_length=30, n_fft=400, padding_side="right"),
        tokenizer=tok, chat_template=OMNI_CHAT_TEMPLATE)
    with _staging(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # The released folder keeps the image processor and the Whisper feature extractor in one
        # preprocessor_config.json (saving them one after the other would keep only the last).
        merged = {**processor.feature_extractor.to_dict(), **processor.image_processor.to_dict()}
        merged.pop("mel_filters", None)
        merged["processor_class"] = "Qwen2_5OmniProcessor"
        with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as fh:
            json.dump(merged, fh, indent=2)
    return out_dir


INTERNVL_SYSTEM = "You are InternVL, a multimodal large language model."
INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

# InternVL (-hf) chat template format: system message, <IMG_CONTEXT> / <video> per media item, ChatML turns.
INTERNVL_CHAT_TEMPLATE = chat_template(INTERNVL_SYSTEM)


def build_internvl(out_dir: str, seed: int = 0, num_layers: int = 2, hidden: int = 64, tile: int = 56) -> str:
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    tok = build_tokenizer(out_dir, special_tokens=INTERNVL_SPECIAL_TOKENS, chat_template=INTERNVL_CHAT_TEMPLATE,
                          extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS}
    per_tile = (tile // 14) ** 2 // 4  # pixel shuffle with downsample ratio 0.5
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=[tile, tile], patch_size=[14, 14], use_mean_pooling=True),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=per_tile, downsample_ratio=0.5,
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _spread(model, seed)
    size = {"height": tile, "width": tile}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4,
                                              do_normalize=True),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tok, image_seq_length=per_tile, chat_template=INTERNVL_CHAT_TEMPLATE)
    with _staging(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out_dir


MINICPMO_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<image>", "</image>", "<slice>", "</slice>",
    "<image_id>", "</image_id>", "<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>",
    "<|spk_eos|>", "<|tts_bos|>", "<|tts_eos|>",
]
# MiniCPM-o-2.6's chat template: ChatML with a default system message.
MINICPMO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The remote-code entry points a released MiniCPM-o folder names (its .py files are not part of the tiny folder:
# X2I never runs them).
MINICPMO_AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMOConfig", "AutoModel": "modeling_minicpmo.MiniCPMO",
                     "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO"}


def minicpmo_preprocessor_config(scale: int = 56, queries: int = 8) -> dict:
    """A MiniCPM-o ``preprocessor_config.json``: the image processor's slicing and normalisation settings and the
    Whisper feature extractor's, in one file as released."""
    return {"image_processor_type": "MiniCPMVImageProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
            "processor_class": "MiniCPMOProcessor",
            "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
                         "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
            "max_slice_nums": 9, "scale_resolution": scale, "patch_size": 14, "use_image_id": True,
            "image_feature_size": queries, "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>",
            "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
            "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
            "feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
            "padding_value": 0.0, "padding_side": "right", "return_attention_mask": False}


def build_minicpmo(out_dir: str, seed: int = 0, num_layers: int = 2, hidden: int = 128) -> str:
    """A MiniCPM-o-2.6 folder as released, minus the TTS model and the remote code: ``config.json`` (Qwen2 keys at
    the top, ``vision_config``, ``audio_config``, MiniCPM-o's keys, ``auto_map``), ``model.safetensors`` with
    MiniCPM-o's key names, a Qwen2-style tokenizer with MiniCPM-o's tokens (``tokenizer_class``
    ``MiniCPMOTokenizerFast``) and ``preprocessor_config.json``.  ``hidden`` must be a multiple of 128 (the
    resampler has hidden / 128 heads)."""
    from safetensors.torch import save_file

    from ..mllm.minicpmo_native import MiniCPMOFromFiles

    with _staging(out_dir) as tmp:
        tok = build_tokenizer(tmp, special_tokens=MINICPMO_SPECIAL_TOKENS, chat_template=MINICPMO_CHAT_TEMPLATE)
        tok.model_max_length = 8192
        tok.padding_side = "right"
        tok.save_pretrained(tmp)
        path = os.path.join(tmp, "tokenizer_config.json")
        with open(path, encoding="utf-8") as fh:
            tcfg = json.load(fh)
        tcfg["tokenizer_class"] = "MiniCPMOTokenizerFast"
        tcfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_minicpmo_fast.MiniCPMOTokenizerFast"]}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(tcfg, fh, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as fh:
            json.dump(minicpmo_preprocessor_config(), fh, indent=2)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
        cfg = {"architectures": ["MiniCPMO"], "auto_map": MINICPMO_AUTO_MAP, "model_type": "minicpmo",
               "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": hidden * 2,
               "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
               "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 32768,
               "max_window_layers": num_layers, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
               "torch_dtype": "float32", "query_num": 8, "image_size": 448, "drop_vision_last_layer": True,
               "batch_vision_input": True, "use_image_id": True, "vision_batch_size": 16, "audio_pool_step": 2,
               "audio_chunk_length": 1.0, "chunk_input": True, "stream_input": False, "init_vision": True,
               "init_audio": True, "init_tts": True,
               "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv", "scale_resolution": 56},
               "vision_config": {"hidden_size": 32, "image_size": 140, "intermediate_size": 64, "model_type": "siglip",
                                 "num_attention_heads": 2, "num_hidden_layers": 3, "patch_size": 14},
               "audio_config": {"model_type": "whisper", "d_model": 32, "encoder_layers": 2,
                                "encoder_attention_heads": 2, "encoder_ffn_dim": 128, "num_mel_bins": 80,
                                "max_source_positions": 1500, "activation_function": "gelu"}}
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=2)
        torch.manual_seed(seed)
        model = MiniCPMOFromFiles(cfg, tmp)
        g = torch.Generator().manual_seed(seed)
        state = {}
        for name, p in model.state_dict().items():
            noise = torch.randn(p.shape, generator=g) * 0.05
            norm = p.dim() == 1 and any(k in name for k in ("norm", "ln_"))
            state[name] = (1.0 + noise if norm else noise).contiguous()
        # as released: the LM head too (X2I never reads it)
        state["llm.lm_head.weight"] = torch.randn(len(tok), hidden, generator=g) * 0.05
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
