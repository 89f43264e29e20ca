"""MiniCPM-o-2.6 from its files alone: no Python from the model folder is imported or run.

A MiniCPM-o folder ships its model as remote code (``modeling_minicpmo.py`` and friends, for transformers 4.48).
This module reads what the folder *describes* instead:

* ``config.json`` as JSON: the Qwen2 language model's settings at the top level, ``vision_config`` (a
  SigLIP-NaViT tower), ``audio_config`` (a Whisper encoder) and MiniCPM-o's own keys (``query_num``,
  ``drop_vision_last_layer``, ``audio_pool_step``, ``audio_chunk_length``, ``vision_batch_size`` ...);
* the weights as safetensors only (a folder with only torch pickles is refused);
* the tokenizer from its JSON files with transformers' own Qwen2 tokenizer class, and the image and audio
  settings from ``preprocessor_config.json``.

The model is built from transformers' ``Qwen2Model`` (the language model, whose prefill hidden states X2I
reads) plus small modules of ours for the parts no transformers class covers with the same arithmetic: the
NaViT SigLIP tower (bucketed 2-D positions over a 70x70 table, eager attention with the patch mask), the
perceiver resampler (64 learned queries, 2-D sin-cos key positions, ``nn.MultiheadAttention``-style
attention), the Whisper audio encoder with MiniCPM-o's chunked (1-second, block-causal) attention, the
audio projector and its average pooling.  The state-dict keys are MiniCPM-o's own (``llm.model.*``,
``vpm.*``, ``resampler.*``, ``apm.*``, ``audio_projection_layer.*``), so a released folder loads as it is.

The processor side (:class:`MiniCPMOFilesProcessor`) does what X2I's two recipes need of MiniCPM-o's
processor: one slice per image (``max_slice_nums=1``: the image is resized, aspect kept, to about
``scale_resolution``\\ :sup:`2` pixels on the 14-px patch grid, bicubic, normalised with the folder's mean and
std, and cut into patches), ``(<image>./</image>)`` and ``(<audio>./</audio>)`` tags expanded into
``<image><unk>x64</image>`` and per-second ``<|audio_start|><unk>xN<|audio_end|>`` runs, Whisper log-mel
features (transformers' ``WhisperFeatureExtractor`` with the folder's settings) and the image / audio bounds.
Image slicing into several tiles (``max_slice_nums`` > 1) is not part of X2I's recipes and is refused.

What the reference computed is pinned by an oracle (``tests/test_minicpmo_oracle.py``): the reference
repository's own MiniCPM-o code, run on transformers 4.48 beside this module on the same tiny folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import X2IFileError, X2IInputError

log = logging.getLogger(__name__)

IMAGE_TAG = "(<image>./</image>)"
AUDIO_TAG = "(<audio>./</audio>)"
_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(AUDIO_TAG)})")

# The reference's SigLIP-NaViT config defaults (its modeling_navit_siglip.SiglipVisionConfig), and the tower
# MiniCPM-o uses when config.json has no vision_config.
SIGLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6}
MINICPMO_VISION = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "num_attention_heads": 16,
                   "num_hidden_layers": 27, "patch_size": 14}
# MiniCPM-o's own config keys and their defaults (configuration_minicpm.MiniCPMOConfig).
MINICPMO_DEFAULTS = {"query_num": 64, "image_size": 448, "drop_vision_last_layer": True, "vision_batch_size": 16,
                     "audio_pool_step": 2, "audio_chunk_length": 1.0, "chunk_input": True, "init_vision": True,
                     "init_audio": True}
# Keys of the checkpoint that X2I does not use: the LM head and the TTS model.
UNUSED_PREFIXES = ("llm.lm_head.", "tts.")
# MiniCPM-o's image processor settings (image_processing_minicpmv.MiniCPMVImageProcessor) and their defaults.
IMAGE_DEFAULTS = {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "image_feature_size": 64,
                  "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
                  "unk": "<unk>", "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "use_image_id": False,
                  "slice_mode": True}
WHISPER_KEYS = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value",
                "return_attention_mask")
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"


# -- the towers ---------------------------------------------------------------------------------------------------

def _act(name: str):
    table = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
             "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu,
             "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
    if name not in table:
        raise X2IFileError(f"activation {name!r} in the MiniCPM-o config is not supported; expected one of "
                           f"{sorted(table)}")
    return table[name]


class _SelfAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections."""

    def __init__(self, dim: int, heads: int, k_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise X2IFileError(f"hidden size {dim} is not divisible by {heads} attention heads")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)

    def _heads(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask=None):
        """Eager: the product scaled, the additive mask, softmax in fp32 (SigLIP's eager path, which MiniCPM-o
        forces for its vision tower)."""
        b, s, d = x.shape
        q = self._heads(self.q_proj(x))
        w = torch.matmul(q, self._heads(self.k_proj(x)).transpose(2, 3)) * self.scale
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, self._heads(self.v_proj(x))).transpose(1, 2).reshape(b, s, d)
        return self.out_proj(out)

    def sdpa(self, x, mask=None):
        """PyTorch's SDPA with the additive mask (Whisper's SDPA attention, which the reference's audio
        encoder runs when the model is loaded with attn_implementation='sdpa')."""
        b, s, d = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class _SiglipLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.self_attn = _SelfAttention(d, cfg["num_attention_heads"])
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, cfg["intermediate_size"]), nn.Linear(cfg["intermediate_size"], d)
        self.act = _act(cfg["hidden_act"])

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class NaViTSiglip(nn.Module):
    """MiniCPM-o's SigLIP tower for images of any aspect: patches of one image sit in a row (``tgt_sizes`` gives
    each image's patch grid), positions are bucketed onto the ``image_size / patch_size`` square table, and
    padded patches are masked out of attention."""

    def __init__(self, cfg: dict, num_layers: int):
        super().__init__()
        d, p = cfg["hidden_size"], cfg["patch_size"]
        self.patch_size, self.side = p, cfg["image_size"] // p
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(cfg["num_channels"], d, kernel_size=p, stride=p)
        self.embeddings.position_embedding = nn.Embedding(self.side ** 2, d)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_SiglipLayer(cfg) for _ in range(num_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])

    def positions(self, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Position ids ``[B, L]``: each image's fractional patch coordinates bucketed onto the table (the
        reference's float32 ``arange`` / ``bucketize`` arithmetic, so edge cases land in the same bucket)."""
        b, n = patch_mask.shape
        bounds = torch.arange(1 / self.side, 1.0, 1 / self.side)
        ids = torch.zeros(b, n, dtype=torch.long)
        for i in range(b):
            h, w = tgt_sizes[i][0], tgt_sizes[i][1]
            rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), bounds, right=True)
            cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), bounds, right=True)
            ids[i][patch_mask[i].cpu()] = (rows[:, None] * self.side + cols).flatten()
        return ids

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        pos = self.positions(patch_mask, tgt_sizes).to(x.device)
        x = x + self.embeddings.position_embedding(pos)
        mask = None
        if not bool(patch_mask.all()):
            keep = patch_mask[:, None, None, :].to(x.dtype)
            mask = ((1.0 - keep) * torch.finfo(x.dtype).min).expand(-1, 1, x.shape[1], -1)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """``[h, w, dim]``: half the channels encode the column, half the row (sin then cos each), frequencies
    ``1 / 10000^(2i/dim)`` - in float32 numpy, as the reference builds its table."""
    if dim % 4:
        raise X2IFileError(f"the resampler's width {dim} must be a multiple of 4 (2-D sin-cos positions)")

    def axis(pos):
        omega = np.arange(dim // 4, dtype=np.float32)
        omega /= dim / 4.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return torch.from_numpy(np.concatenate([axis(cols), axis(rows)], axis=-1)).float()


class _MHA(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed in-projection) and its weights-returning arithmetic."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query, key, value, key_padding_mask):
        q_len, b, d = query.shape
        hd = d // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).view(q_len, b * self.heads, hd).transpose(0, 1)
        k = F.linear(key, wk, bk).view(key.shape[0], b * self.heads, hd).transpose(0, 1)
        v = F.linear(value, wv, bv).view(value.shape[0], b * self.heads, hd).transpose(0, 1)
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            key_padding_mask, float("-inf"))
        pad = pad.view(b, 1, 1, -1).expand(-1, self.heads, -1, -1).reshape(b * self.heads, 1, -1)
        w = F.softmax(torch.baddbmm(pad, q / math.sqrt(hd), k.transpose(-2, -1)), dim=-1)
        out = torch.bmm(w, v).transpose(0, 1).contiguous().view(q_len * b, d)
        return self.out_proj(out).view(q_len, b, d)


class Resampler(nn.Module):
    """One cross-attention from ``num_queries`` learned queries onto an image's patch features."""

    def __init__(self, num_queries: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = _MHA(dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(torch.empty(dim, dim))
        self.dim = dim

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        lengths = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        table = sincos_2d(self.dim, max(70, int(tgt_sizes[:, 0].max())), max(70, int(tgt_sizes[:, 1].max())))
        table = table.to(x.device)
        pad = torch.zeros((b, int(lengths.max())), dtype=torch.bool, device=x.device)
        pos = []
        for i in range(b):
            h, w = int(tgt_sizes[i][0]), int(tgt_sizes[i][1])
            pos.append(table[:h, :w, :].reshape(h * w, -1).to(x.dtype))
            pad[i, int(lengths[i]):] = True
        pos = nn.utils.rnn.pad_sequence(pos, batch_first=True, padding_value=0.0).permute(1, 0, 2)
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, b, 1)
        out = self.attn(q, kv + pos, kv, pad).permute(1, 0, 2)
        return self.ln_post(out) @ self.proj


class _WhisperLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, act: str):
        super().__init__()
        self.self_attn = _SelfAttention(d, heads, k_bias=False)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.act = _act(act)

    def forward(self, x, mask):
        x = x + self.self_attn.sdpa(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperAudioEncoder(nn.Module):
    """Whisper's encoder as MiniCPM-o runs it: two GELU convolutions, learned positions, pre-norm layers with an
    explicit additive mask, final LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(_WhisperLayer(d, cfg.encoder_attention_heads, cfg.encoder_ffn_dim,
                                                  cfg.activation_function) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight[: x.shape[1], :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x)


class _Projector(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))


class _LLM(nn.Module):
    """Holds the Qwen2 decoder at ``llm.model`` (MiniCPM-o's key layout); X2I never needs the LM head."""

    def __init__(self, model, config):
        super().__init__()
        self.model, self.config = model, config


# -- the model ----------------------------------------------------------------------------------------------------

def _get(cfg: dict, key: str, kind, path: str, where: str = ""):
    value = cfg.get(key)
    if kind is bool:
        if not isinstance(value, bool):
            raise X2IFileError(f"MiniCPM-o config '{path}': {where}{key} must be true or false, found {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise X2IFileError(f"MiniCPM-o config '{path}': {where}{key} must be a {'whole ' if kind is int else ''}"
                           f"number, found {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise X2IFileError(f"MiniCPM-o config '{path}': {where}{key} must be positive, found {value!r}")
    return kind(value)


def minicpmo_settings(cfg: dict, path: str) -> dict[str, Any]:
    """MiniCPM-o's own keys with the reference's defaults, and the vision config with SigLIP's, checked."""
    out = {k: cfg.get(k, v) for k, v in MINICPMO_DEFAULTS.items()}
    for key in ("query_num", "vision_batch_size", "audio_pool_step"):
        out[key] = _get(out, key, int, path)
    out["audio_chunk_length"] = float(_get(out, "audio_chunk_length", float, path))
    for key in ("drop_vision_last_layer", "chunk_input", "init_vision", "init_audio"):
        out[key] = _get(out, key, bool, path)
    vision = cfg.get("vision_config")
    if vision is None:
        vision = dict(MINICPMO_VISION)
    if not isinstance(vision, dict):
        raise X2IFileError(f"MiniCPM-o config '{path}': vision_config must be an object, found {type(vision).__name__}")
    vision = {**SIGLIP_DEFAULTS, **{k: v for k, v in vision.items() if k in SIGLIP_DEFAULTS}}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size"):
        vision[key] = _get(vision, key, int, path, "vision_config.")
    vision["layer_norm_eps"] = _get(vision, "layer_norm_eps", float, path, "vision_config.")
    out["vision"] = vision
    return out


def _qwen2_config(cfg: dict, path: str):
    from transformers import Qwen2Config

    skip = {"model_type", "auto_map", "architectures", "vision_config", "audio_config", "tts_config", "slice_config",
            "transformers_version", *MINICPMO_DEFAULTS}
    try:
        qcfg = Qwen2Config(**{k: v for k, v in cfg.items() if k not in skip})
    except (TypeError, ValueError, KeyError) as exc:
        raise X2IFileError(f"MiniCPM-o config '{path}': its language-model keys do not make a Qwen2 config "
                           f"({type(exc).__name__}: {exc})") from exc
    qcfg._attn_implementation = "sdpa"  # the reference loads MiniCPM-o with attn_implementation='sdpa'
    return qcfg


def _whisper_config(cfg: dict, path: str):
    from transformers import WhisperConfig

    audio = cfg.get("audio_config") or {}
    if not isinstance(audio, dict):
        raise X2IFileError(f"MiniCPM-o config '{path}': audio_config must be an object, found {type(audio).__name__}")
    try:
        wcfg = WhisperConfig(**{k: v for k, v in audio.items() if k not in ("model_type", "architectures")})
    except (TypeError, ValueError) as exc:
        raise X2IFileError(f"MiniCPM-o config '{path}': audio_config is not a Whisper config ({exc})") from exc
    for key in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                "max_source_positions"):
        _get(vars(wcfg), key, int, path, "audio_config.")
    return wcfg


class MiniCPMOFromFiles(nn.Module):
    """MiniCPM-o-2.6 without its remote code: ``prefill`` returns the language model's hidden states for a
    prepared prompt (``[1, layers + 1, S, H]``), as the reference's ``generate(max_new_tokens=1)`` prefill."""

    def __init__(self, cfg: dict, path: str = "<config>"):
        super().__init__()
        from transformers import Qwen2Model

        self.settings = s = minicpmo_settings(cfg, path)
        self.config = _qwen2_config(cfg, path)
        self.scale_emb = cfg.get("scale_emb")
        self.llm = _LLM(Qwen2Model(self.config), self.config)
        d = self.config.hidden_size
        self.vpm = self.resampler = self.apm = None
        if s["init_vision"]:
            v = s["vision"]
            layers = v["num_hidden_layers"] - (1 if s["drop_vision_last_layer"] else 0)
            self.vpm = NaViTSiglip(v, layers)
            if d % 128:
                raise X2IFileError(f"MiniCPM-o config '{path}': hidden_size {d} must be a multiple of 128 (the "
                                   "resampler has hidden_size / 128 heads)")
            self.resampler = Resampler(s["query_num"], d, d // 128, v["hidden_size"])
        if s["init_audio"]:
            self.audio_config = w = _whisper_config(cfg, path)
            self.apm = WhisperAudioEncoder(w)
            self.audio_projection_layer = _Projector(w.encoder_ffn_dim // 4, d)
            self.pool = s["audio_pool_step"]

    # -- weights ----------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str, dtype: torch.dtype = torch.float32) -> "MiniCPMOFromFiles":
        from .chat import read_model_config

        cfg = read_model_config(path)
        with torch.device("meta"):
            model = cls(cfg, path)
        expected = dict(model.state_dict())
        state, keys = read_safetensors_folder(path, wanted=set(expected))
        missing = [k for k in expected if k not in state]
        if missing:
            raise X2IFileError(f"MiniCPM-o folder '{path}': the weights lack {len(missing)} tensor(s) its config.json "
                               f"describes, e.g. {missing[:3]} - download the model's *.safetensors files completely")
        unknown = [k for k in keys if k not in expected and not k.startswith(UNUSED_PREFIXES)]
        if unknown:
            log.warning("MiniCPM-o folder '%s': %d weight tensor(s) not used by X2I, e.g. %s", path, len(unknown),
                        unknown[:3])
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise X2IFileError(f"MiniCPM-o folder '{path}': tensor {key} has shape {tuple(state[key].shape)}, "
                                   f"but config.json describes {tuple(ref.shape)}")
        model.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=True, assign=True)
        rotary = model.llm.model.rotary_emb
        model.llm.model.rotary_emb = type(rotary)(config=model.config)  # its buffers are not in the checkpoint
        return model.eval().requires_grad_(False)

    # -- forward ----------------------------------------------------------------------------------------------
    def vision_states(self, pixel_values: list, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Every image's resampled features ``[N, query_num, H]``; ``pixel_values``: one ``[3, p, n*p]`` per
        image (patches in a row), ``tgt_sizes``: ``[N, 2]`` patch grids."""
        dev, dtype = self.llm.model.embed_tokens.weight.device, self.llm.model.embed_tokens.weight.dtype
        rows = nn.utils.rnn.pad_sequence([x.flatten(end_dim=1).permute(1, 0) for x in pixel_values],
                                         batch_first=True, padding_value=0.0)
        b, n, _ = rows.shape
        pixels = rows.permute(0, 2, 1).reshape(b, 3, -1, n).to(dev, dtype)
        tgt = tgt_sizes.to(torch.int32)
        longest = int((tgt[:, 0] * tgt[:, 1]).max())
        mask = torch.zeros((b, longest), dtype=torch.bool, device=dev)
        for i in range(b):
            mask[i, : int(tgt[i][0] * tgt[i][1])] = True
        step = self.settings["vision_batch_size"]
        out = torch.cat([self.vpm(pixels[i:i + step], mask[i:i + step], tgt[i:i + step]) for i in range(0, b, step)])
        return self.resampler(out, tgt)

    def audio_states(self, features: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per clip (30-s piece), its pooled, projected states ``[n_i, H]``."""
        b, _, frames = features.shape
        seq = (frames - 1) // 2 + 1
        pad = torch.arange(seq, device=lengths.device)[None, :].expand(b, seq) >= lengths[:, None]
        blocked = pad.view(b, 1, 1, seq).expand(b, 1, seq, seq)
        chunk = self.settings["audio_chunk_length"]
        if chunk > 0:
            size = int(chunk * 50)
            block = torch.arange(seq) // size
            allowed = block[None, :] <= block[:, None]  # a query sees its own 1-s chunk and all earlier ones
            blocked = torch.logical_or(blocked, torch.logical_not(allowed.to(blocked.device)))
        dtype = self.apm.conv1.weight.dtype
        mask = torch.zeros(blocked.shape, dtype=dtype, device=self.apm.conv1.weight.device)
        mask[blocked.to(mask.device)] = float("-inf")
        states = self.audio_projection_layer(self.apm(features, mask))
        states = F.avg_pool1d(states.transpose(1, 2), self.pool, stride=self.pool).transpose(1, 2)
        after_cnn = (lengths - 1) // 2 + 1
        kept = ((after_cnn - self.pool) // self.pool + 1).to(torch.int32)
        return [states[i, : int(kept[i])] for i in range(b)]

    def embeddings(self, inputs: dict) -> torch.Tensor:
        ids = inputs["input_ids"].to(self.llm.model.embed_tokens.weight.device)
        emb = self.llm.model.embed_tokens(ids)
        if self.scale_emb is not None:
            emb = emb * self.scale_emb
        emb = emb.clone()
        pixels = inputs.get("pixel_values") or [[]]
        if pixels[0]:
            if self.vpm is None:
                raise X2IInputError("this MiniCPM-o folder has no vision tower (init_vision false); remove the images")
            vis = self.vision_states(pixels[0], inputs["tgt_sizes"][0]).to(emb.dtype)
            bounds = inputs["image_bound"][0]
            if len(bounds):
                idx = torch.cat([torch.arange(int(a), int(b)) for a, b in bounds]).to(emb.device)
                emb[0, idx] = vis.reshape(-1, vis.shape[-1])
        feats = inputs.get("audio_features")
        if isinstance(feats, torch.Tensor) and len(feats):
            if self.apm is None:
                raise X2IInputError("this MiniCPM-o folder has no audio encoder (init_audio false); remove the audio")
            clips = self.audio_states(feats.to(self.apm.conv1.weight.device),
                                      torch.hstack(list(inputs["audio_feature_lens"])).to(self.apm.conv1.weight.device))
            flat = torch.cat(clips, dim=0).to(emb.dtype)
            at = 0
            for a, b in inputs["audio_bounds"][0]:
                a, b = int(a), int(b)
                emb[0, a:b] = flat[at:at + b - a]
                at += b - a
        return emb

    def prefill(self, inputs: dict) -> torch.Tensor:
        """The language model's states over the prompt, all layers: ``[1, layers + 1, S, H]``."""
        emb = self.embeddings(inputs)
        mask = inputs["attention_mask"].to(emb.device).long()
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        out = self.llm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False,
                             output_hidden_states=True, return_dict=True)
        if out.hidden_states is None:
            raise X2IInputError("the MiniCPM-o language model returned no hidden states")
        return torch.stack(tuple(out.hidden_states), dim=1)


def read_safetensors_folder(path: str, wanted: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """From the folder's ``*.safetensors`` files (the index's shards when there is an index): the tensors named in
    ``wanted``, and the name of every tensor the files hold (the others - the TTS model, the LM head - are never
    read); a folder with only torch pickles is refused, never unpickled."""
    from safetensors import SafetensorError, safe_open

    names = sorted(os.listdir(path))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            try:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise X2IFileError(f"MiniCPM-o folder '{path}': model.safetensors.index.json is not a weights index "
                                   f"({exc})") from exc
        absent = [s for s in shards if s not in names]
        if absent:
            raise X2IFileError(f"MiniCPM-o folder '{path}': the weights index names {absent[:3]}, which are not in "
                               "the folder - download the model's *.safetensors files completely")
    else:
        shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f"; it has only torch pickles ({', '.join(pickles[:3])}), which X2I does not unpickle for MiniCPM-o - "
                "get the model's .safetensors weights") if pickles else ""
        raise X2IFileError(f"MiniCPM-o folder '{path}' has no *.safetensors weights{hint}")
    state: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    for shard in shards:
        try:
            with safe_open(os.path.join(path, shard), framework="pt") as fh:
                held = list(fh.keys())
                keys.extend(held)
                state.update((k, fh.get_tensor(k)) for k in held if k in wanted)
        except (SafetensorError, OSError) as exc:
            raise X2IFileError(f"MiniCPM-o folder '{path}': {shard} is truncated or corrupt ({exc}); download it "
                               "again") from exc
    return state, keys


# -- the processor ------------------------------------------------------------------------------------------------

def _ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)


def one_slice_size(size: tuple[int, int], scale: int, patch: int) -> tuple[int, int]:
    """The size MiniCPM-o resizes an image to with one slice: aspect kept, about ``scale``\\ :sup:`2` pixels (up
    or down), each side rounded to the patch grid."""
    width, height = size
    r = width / height
    height = int(scale / math.sqrt(r))
    width = int(height * r)
    return _ensure_divide(width, patch), _ensure_divide(height, patch)


class MiniCPMOFilesProcessor:
    """MiniCPM-o's processor for X2I's recipes, from the folder's tokenizer and ``preprocessor_config.json``."""

    def __init__(self, tokenizer, image: dict, whisper):
        self.tokenizer, self.image, self.feature_extractor = tokenizer, image, whisper
        self.patch = int(image["patch_size"])

    @classmethod
    def from_folder(cls, path: str) -> "MiniCPMOFilesProcessor":
        from transformers import WhisperFeatureExtractor

        from .chat import read_json_object

        pre = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(pre):
            raise X2IFileError(f"MiniCPM-o folder '{path}' has no preprocessor_config.json (its image and audio "
                               "settings) - download the model folder completely")
        raw = read_json_object(pre, "MiniCPM-o preprocessor config")
        image = {k: raw.get(k, v) for k, v in IMAGE_DEFAULTS.items()}
        for key in ("scale_resolution", "patch_size", "image_feature_size", "max_slice_nums"):
            image[key] = _get(image, key, int, pre)
        for key in ("norm_mean", "norm_std"):
            vals = image[key]
            if (not isinstance(vals, list) or len(vals) != 3 or
                    any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in vals)):
                raise X2IFileError(f"'{pre}': {key} must be a list of 3 numbers, found {vals!r}")
            if key == "norm_std" and any(v <= 0 for v in vals):
                raise X2IFileError(f"'{pre}': norm_std must be positive, found {vals!r}")
        whisper = WhisperFeatureExtractor(**{k: raw[k] for k in WHISPER_KEYS if k in raw})
        return cls(load_tokenizer(path), image, whisper)

    # -- images -----------------------------------------------------------------------------------------------
    def image_patches(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (``[3, p, n*p]`` patches in a row, its ``(rows, cols)`` patch grid)."""
        from PIL import Image

        img = image.convert("RGB")
        img = img.resize(one_slice_size(img.size, int(self.image["scale_resolution"]), self.patch),
                         resample=Image.Resampling.BICUBIC)
        arr = np.asarray(img).astype(np.float32) / 255
        mean = np.array(self.image["norm_mean"], dtype=np.float32)
        std = np.array(self.image["norm_std"], dtype=np.float32)
        chw = torch.from_numpy(np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1)))
        p = self.patch
        cols = F.unfold(chw, (p, p), stride=(p, p))
        patches = cols.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)
        return patches, (chw.shape[1] // p, chw.shape[2] // p)

    def image_placeholder(self) -> str:
        im = self.image
        return im["im_start"] + im["unk"] * int(im["image_feature_size"]) + im["im_end"]

    # -- audio ------------------------------------------------------------------------------------------------
    def audio_placeholder(self, samples: int, chunk_input: bool, chunk_length: float = 1.0) -> str:
        hop, pool = self.feature_extractor.hop_length, 2
        frames = math.ceil(samples / hop)
        tokens = ((frames - 1) // 2 + 1 - pool) // pool + 1
        if not chunk_input:
            return AUDIO_START + "<unk>" * tokens + AUDIO_END
        per_chunk = ((int(chunk_length * 100) - 1) // 2 + 1 - pool) // pool + 1
        out, done = [], 0
        for _ in range((tokens + per_chunk - 1) // per_chunk):
            n = min(per_chunk, tokens - done)
            out.append(AUDIO_START + "<unk>" * n + AUDIO_END)
            done += n
        return "".join(out)

    def audio_features(self, clips: list[np.ndarray], rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper log-mel features of every clip cut into <= 30-s pieces, each trimmed to its length and
        right-padded with zeros to the longest: ``([N, mels, frames], [N] lengths)``."""
        longest = 30 * rate
        pieces = []
        for clip in clips:
            if len(clip) <= longest:
                pieces.append(clip)
            else:
                pieces.extend(clip[i * longest:(i + 1) * longest] for i in range(math.ceil(len(clip) / longest)))
        feats = self.feature_extractor(pieces, sampling_rate=rate, return_attention_mask=True, padding="max_length",
                                       return_tensors="pt")
        lengths = feats["attention_mask"].sum(dim=1)
        kept = [f[:, : int(n)].permute(1, 0) for f, n in zip(feats["input_features"], lengths)]
        return nn.utils.rnn.pad_sequence(kept, batch_first=True, padding_value=0.0).permute(0, 2, 1), lengths

    # -- the prompt -------------------------------------------------------------------------------------------
    def __call__(self, text: str, images: list | None = None, audios: list | None = None, *, max_length: int,
                 chunk_input: bool = True, rate: int = 16000, pad_to_model_max: bool = False) -> dict[str, Any]:
        """One prompt -> the model's inputs (ids int32, a bool mask, patches, grids, bounds, audio features).
        ``pad_to_model_max``: the training recipe's ``padding="max_length"`` without a length, which pads the
        encoded ids to the tokenizer's ``model_max_length`` on its padding side before ``max_length`` cuts."""
        images, audios = list(images or []), list(audios or [])
        chunks = _SPLIT.split(text)
        if chunks.count(IMAGE_TAG) != len(images) or chunks.count(AUDIO_TAG) != len(audios):
            raise X2IInputError(f"the prompt has {chunks.count(IMAGE_TAG)} image and {chunks.count(AUDIO_TAG)} audio "
                                f"tag(s) for {len(images)} image(s) and {len(audios)} clip(s)")
        audio_ph = iter([self.audio_placeholder(len(a), chunk_input) for a in audios])
        text = "".join(self.image_placeholder() if c == IMAGE_TAG else next(audio_ph) if c == AUDIO_TAG else c
                       for c in chunks)
        ids = self.encode(text, pad_to_model_max)[:max_length]
        ids = torch.tensor(ids, dtype=torch.int32)
        tok = self.tokenizer

        def tid(t):
            return tok.convert_tokens_to_ids(t)

        im = self.image
        starts = torch.where((ids == tid(im["im_start"])) | (ids == tid(im["slice_start"])))[0] + 1
        ends = torch.where((ids == tid(im["im_end"])) | (ids == tid(im["slice_end"])))[0]
        n = max(len(starts), len(ends))
        image_bound = torch.hstack([starts[:n].unsqueeze(-1), ends[:n].unsqueeze(-1)])
        a_start, a_end = torch.where(ids == tid(AUDIO_START))[0], torch.where(ids == tid(AUDIO_END))[0]
        if len(a_start) != len(a_end):
            raise X2IInputError("the prompt was cut inside an audio clip's tokens; shorten the audio or the text")
        audio_bounds = torch.hstack([(a_start + 1).unsqueeze(-1), a_end.unsqueeze(-1)])
        out: dict[str, Any] = {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.bool),
                               "image_bound": [image_bound], "audio_bounds": [audio_bounds]}
        if images:
            done = [self.image_patches(img) for img in images]
            out["pixel_values"] = [[p for p, _ in done]]
            out["tgt_sizes"] = [torch.tensor([g for _, g in done], dtype=torch.int64)]
        else:
            out["pixel_values"], out["tgt_sizes"] = [[]], [[]]
        if audios:
            feats, lengths = self.audio_features(audios, rate)
            out["audio_features"], out["audio_feature_lens"] = feats, [lengths]
        else:
            out["audio_features"], out["audio_feature_lens"] = [], []
        return out

    def encode(self, text: str, pad_to_model_max: bool) -> list[int]:
        tok = self.tokenizer
        ids = list(tok.encode(text, add_special_tokens=True))
        if not pad_to_model_max:
            return ids
        # transformers 4.48: padding="max_length" without max_length pads to model_max_length unless that is
        # "unset" (> 1e30, then no padding with a warning); no truncation.
        length = tok.model_max_length
        if length is None or length > int(1e30) or length <= len(ids):
            return ids
        if tok.pad_token_id is None:
            raise X2IFileError("the MiniCPM-o tokenizer has no pad token, but the 'training' recipe pads")
        pads = [int(tok.pad_token_id)] * (length - len(ids))
        return pads + ids if tok.padding_side == "left" else ids + pads


def load_tokenizer(path: str):
    """The folder's tokenizer with transformers' own Qwen2 class: its files say ``MiniCPMOTokenizerFast``, a
    remote-code subclass that only adds names for special tokens, so the files load as a Qwen2 tokenizer."""
    from transformers import Qwen2TokenizerFast

    try:
        tok = Qwen2TokenizerFast.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise X2IFileError(f"MiniCPM-o folder '{path}': its tokenizer files cannot be read ({type(exc).__name__}: "
                           f"{exc}) - download the model folder completely") from exc
    vocab = tok.get_vocab()
    needed = [t for t in ("<image>", "</image>", "<unk>", AUDIO_START, AUDIO_END) if t not in vocab]
    if needed:
        raise X2IFileError(f"MiniCPM-o folder '{path}': its tokenizer lacks MiniCPM-o's tokens {needed}; is it a "
                           "MiniCPM-o-2.6 folder?")
    return tok
