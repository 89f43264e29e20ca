"""AlignNet: MLLM hidden states -> FLUX text sequence and pooled vector.

Input ``[B, C, S, H]`` (C = MLLM layers + 1, H = MLLM hidden size), output
``(pooled [B, output_dim0], sequence [B, S, output_dim1])``.

The module, its config keys and its state-dict names follow the published X2I
checkpoints (called ``Proj`` there), so those files load unchanged:

* fusion over the C axis, one of ``conv`` (``Conv2d(C -> 1, k, padding=k//2)``,
  the released checkpoints), ``scale`` (learned ``[1, C, 1, 1]`` weight, then
  mean over C) or a plain mean; optionally preceded by a T5-style encoder stack
  (``use_t5``) applied to every layer's states;
* ``LayerNorm(H) -> Linear(H, D1) -> GELU -> Linear(D1, D1)`` = sequence;
* ``GELU -> Linear(D1, D0)`` on the sequence, mean over tokens = pooled.

Three on-disk layouts are read (detected from content, never from the name):

1. our safetensors: tensors = state dict, metadata ``x2i_format=alignnet``
   and ``config`` = JSON of the config keys;
2. the published ``torch.save({"config": ..., "state_dict": ...})`` file,
   read with ``torch.load(weights_only=True)`` (no code runs);
3. a bare training state dict (``diffusion_pytorch_model.bin`` or a
   safetensors without config) plus a config given by the caller, or inferred
   from tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import X2IFileError, X2IInputError, X2IShapeError
from .io import atomic_save_safetensors, load_weights_file
from .registry import Provenance, describe_dims, provenance_from_metadata, released_file, warn_if_ambiguous

log = logging.getLogger("x2i")

FORMAT_TAG = "alignnet"


@dataclasses.dataclass
class AlignNetConfig:
    """The published config keys, with the published defaults of the 7B net."""

    in_channels: int = 29
    kernel_size: int = 5
    input_dim: int = 3584
    output_dim0: int = 768
    output_dim1: int = 4096
    num_layers: int = 2
    num_heads: int = 28
    norm_eps: float = 1e-6
    head_dim: int = 128
    use_t5: bool = False
    use_scale: bool = False
    use_cnn: bool = True

    @property
    def fusion(self) -> str:
        if self.use_scale:
            return "scale"
        if self.use_cnn:
            return "conv"
        return "mean"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "AlignNetConfig":
        if not isinstance(data, Mapping):
            raise X2IFileError(f"{source}: AlignNet config must be a mapping of the published keys, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise X2IFileError(
                f"{source}: unknown AlignNet config key(s) {unknown}; expected only {sorted(known)}"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                try:
                    kwargs[f.name] = bool(value) if f.type in ("bool", bool) else type(getattr(cls(), f.name))(value)
                except (TypeError, ValueError) as exc:
                    raise X2IFileError(f"{source}: AlignNet config key {f.name!r} has unusable value {value!r}") from exc
        cfg = cls(**kwargs)
        for name in ("in_channels", "kernel_size", "input_dim", "output_dim0", "output_dim1"):
            if getattr(cfg, name) <= 0:
                raise X2IFileError(f"{source}: AlignNet config key {name!r} must be positive, found {getattr(cfg, name)}")
        if cfg.use_t5:
            for name in ("num_layers", "num_heads", "head_dim"):
                if getattr(cfg, name) <= 0:
                    raise X2IFileError(f"{source}: AlignNet config key {name!r} must be positive for a T5 "
                                       f"AlignNet (use_t5), found {getattr(cfg, name)}")
        if not (math.isfinite(cfg.norm_eps) and cfg.norm_eps > 0):
            raise X2IFileError(f"{source}: AlignNet config key 'norm_eps' must be a small positive number "
                               f"(published: 1e-6), found {cfg.norm_eps}")
        if cfg.fusion == "conv" and cfg.kernel_size % 2 == 0:
            raise X2IFileError(f"{source}: AlignNet kernel_size must be odd, found {cfg.kernel_size}")
        return cfg

    # Presets of the released pairs, from the registry (x2i_core.registry.KNOWN_MLLMS).
    @classmethod
    def preset(cls, name: str) -> "AlignNetConfig":
        from .registry import KNOWN_MLLMS

        presets = {}
        for m in KNOWN_MLLMS:
            if m.alignnet is None:
                continue
            key = m.name.lower().replace("-instruct", "")
            heads = m.hidden // 128 if m.hidden % 128 == 0 else m.hidden // 64
            presets[key] = cls(in_channels=m.channels, input_dim=m.hidden, num_heads=heads,
                               head_dim=m.hidden // heads, use_scale=m.alignnet == "scale",
                               use_cnn=m.alignnet == "conv")
        if name not in presets:
            raise X2IFileError(f"unknown AlignNet preset {name!r}; expected one of {sorted(presets)}")
        return presets[name]


def _t5_config(cfg: AlignNetConfig):
    from transformers import T5Config

    return T5Config(
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        num_decoder_layers=0,
        layer_norm_epsilon=cfg.norm_eps,
        is_encoder_decoder=False,
        is_decoder=False,
        d_ff=cfg.input_dim * 4,
        d_kv=cfg.head_dim,
        d_model=cfg.input_dim,
        dense_act_fn="gelu_new",
        feed_forward_proj="gated-gelu",
        use_cache=False,
    )


class _Head(nn.Module):
    """LayerNorm -> projector (sequence) and fc (pooled); names as published."""

    def __init__(self, cfg: AlignNetConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.input_dim, eps=cfg.norm_eps)
        self.projector = nn.Sequential(
            nn.Linear(cfg.input_dim, cfg.output_dim1, bias=False),
            nn.GELU(),
            nn.Linear(cfg.output_dim1, cfg.output_dim1, bias=False),
        )
        self.fc = nn.Sequential(nn.GELU(), nn.Linear(cfg.output_dim1, cfg.output_dim0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.projector(self.layernorm(x))
        pooled = self.fc(seq).mean(dim=1)
        return pooled, seq


class AlignNet(nn.Module):
    def __init__(self, config: AlignNetConfig | Mapping[str, Any] | None = None):
        super().__init__()
        if config is None:
            config = AlignNetConfig()
        elif not isinstance(config, AlignNetConfig):
            config = AlignNetConfig.from_dict(config)
        self.config = config
        self.provenance: Provenance | None = None  # the MLLM it was trained for, when known
        if config.use_t5:
            from transformers.models.t5.modeling_t5 import T5Stack

            self.t5stack = T5Stack(_t5_config(config))
        if config.fusion == "scale":
            self.cha_scale = nn.Parameter(torch.empty(1, config.in_channels, 1, 1))
            nn.init.xavier_normal_(self.cha_scale, gain=1)
        elif config.fusion == "conv":
            k = config.kernel_size
            self.conv = nn.Conv2d(config.in_channels, 1, kernel_size=k, padding=(k - 1) // 2)
        self.mlp = _Head(config)

    # -- shape checks -------------------------------------------------------
    @property
    def fits(self) -> str:
        if self.provenance is not None:
            return self.provenance.describe()
        return describe_dims(self.config.in_channels, self.config.input_dim)

    def check_hidden(self, hidden: torch.Tensor, mllm_name: str = "the MLLM", alignnet_name: str = "AlignNet") -> None:
        """Raise X2IShapeError unless ``hidden`` is ``[B, C, S, H]`` with this net's C and H."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 4:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise X2IShapeError(
                f"{alignnet_name}: expected hidden states shaped [batch, layers+1, tokens, hidden], found {shape}"
            )
        _, c, s, h = hidden.shape
        if (c, h) != (self.config.in_channels, self.config.input_dim):
            raise X2IShapeError(
                f"{alignnet_name} expects hidden states of {self.fits}, but {mllm_name} produced "
                f"C={c}, H={h} ({describe_dims(c, h)}). Use the AlignNet trained for that MLLM."
            )
        if s == 0:
            raise X2IShapeError(f"{alignnet_name}: hidden states have no tokens (S=0)")
        if not torch.isfinite(hidden).all():
            raise X2IInputError(f"{alignnet_name}: the hidden states from {mllm_name} contain NaN or infinite "
                                "values; expected finite numbers (load the MLLM in bf16 or fp32 - fp16 overflows)")

    # -- forward ------------------------------------------------------------
    def fuse(self, x: torch.Tensor) -> torch.Tensor:
        b, c, s, h = x.shape
        if self.config.use_t5:
            x = self.t5stack(inputs_embeds=x.contiguous().view(b * c, s, h)).last_hidden_state.view(b, c, s, h)
        if self.config.fusion == "scale":
            return (self.cha_scale * x).mean(dim=1)
        if self.config.fusion == "conv":
            return self.conv(x).squeeze(1)
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(pooled [B, output_dim0], sequence [B, S, output_dim1])``."""
        self.check_hidden(x)
        p = next(self.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        return self.mlp(self.fuse(x))

    # -- saving -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write our safetensors format atomically (config and, when known, the MLLM record in the
        metadata)."""
        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        meta = {"x2i_format": FORMAT_TAG, "config": json.dumps(self.config.to_dict())}
        if self.provenance is not None:
            meta["x2i_mllm"] = self.provenance.to_json()
        atomic_save_safetensors(sd, path, metadata=meta)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_REQUIRED_HEAD = ("mlp.layernorm.weight", "mlp.layernorm.bias", "mlp.projector.0.weight",
                  "mlp.projector.2.weight", "mlp.fc.1.weight", "mlp.fc.1.bias")


def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):  # DDP-wrapped training checkpoints
            k = k[len("module."):]
        if k.startswith("t5."):
            k = "t5stack." + k[len("t5."):]
        out[k] = v
    return out


def infer_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> AlignNetConfig:
    """Derive the config from tensor names and shapes (norm_eps gets the published 1e-6)."""
    missing = [k for k in _REQUIRED_HEAD if k not in sd]
    if missing:
        raise X2IFileError(
            f"{source} is not an AlignNet: missing tensor(s) {missing[:4]}"
            f"{' …' if len(missing) > 4 else ''}; found {len(sd)} tensors such as {sorted(sd)[:3]}"
        )
    d1, h = sd["mlp.projector.0.weight"].shape
    d0 = sd["mlp.fc.1.weight"].shape[0]
    cfg = dict(input_dim=int(h), output_dim1=int(d1), output_dim0=int(d0))
    if "cha_scale" in sd:
        cfg.update(use_scale=True, use_cnn=False, in_channels=int(sd["cha_scale"].shape[1]))
    elif "conv.weight" in sd:
        w = sd["conv.weight"]
        cfg.update(use_scale=False, use_cnn=True, in_channels=int(w.shape[1]), kernel_size=int(w.shape[-1]))
    else:
        raise X2IFileError(
            f"{source}: AlignNet without 'conv.weight' or 'cha_scale' cannot say how many MLLM layers it "
            "fuses; pass its config explicitly"
        )
    t5_blocks = {k.split(".")[2] for k in sd if k.startswith("t5stack.block.")}
    if t5_blocks:
        cfg["use_t5"] = True
        cfg["num_layers"] = len(t5_blocks)
        rel = sd.get("t5stack.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        if rel is not None:
            cfg["num_heads"] = int(rel.shape[1])
            cfg["head_dim"] = int(sd["t5stack.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // cfg["num_heads"]
    return AlignNetConfig.from_dict(cfg, source)


def _build(cfg: AlignNetConfig, sd: Mapping[str, torch.Tensor], source: str) -> AlignNet:
    # The config is a claim: its shapes are compared with the file's tensors on the meta device (no memory, no
    # random init) before anything real is built, so a config that contradicts its tensors costs nothing.
    with torch.device("meta"):
        expected = AlignNet(cfg).state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    # T5Stack may carry an (unused) token embedding; tolerate its absence.
    missing = [k for k in missing if k != "t5stack.embed_tokens.weight"]
    if missing or unexpected:
        raise X2IFileError(
            f"{source}: tensors do not match an AlignNet with config {cfg.to_dict()}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise X2IFileError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)} "
                f"for config {cfg.to_dict()}"
            )
    net = AlignNet(cfg)
    net.load_state_dict(dict(sd), strict=False)
    net.eval().requires_grad_(False)
    return net


def load_alignnet(
    path: str | os.PathLike,
    config: AlignNetConfig | Mapping[str, Any] | str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> AlignNet:
    """Load an AlignNet from any of the three layouts.

    ``config`` is only needed for a bare state dict whose shapes do not say
    enough; it may be a dict of the published keys, an ``AlignNetConfig``, a
    preset name or a path to a JSON file.
    """
    source = f"AlignNet file '{os.fspath(path)}'"
    loaded = load_weights_file(path, what="AlignNet")
    tensors, meta = loaded.tensors, loaded.metadata
    if loaded.nested is not None:
        tensors, config = _published_layout(loaded.nested, config, source)
    sd = _normalise_keys(tensors)
    cfg = _resolve_config(config, meta, sd, source)
    if not any(k.startswith("mlp.") for k in sd):
        infer_config(sd, source)  # raises the "not an AlignNet" message
    net = _build(cfg, sd, source)
    net.source_path = os.fspath(path)
    net.provenance = provenance_from_metadata(meta, source)
    if net.provenance is None:
        release = released_file(path, cfg.in_channels, cfg.input_dim, cfg.fusion)
        if release is not None:
            net.provenance = Provenance.of_release(release)
        else:
            warn_if_ambiguous(cfg.in_channels, cfg.input_dim, source)
    elif (net.provenance.channels, net.provenance.hidden) != (cfg.in_channels, cfg.input_dim):
        raise X2IFileError(f"{source}: its MLLM record says C={net.provenance.channels}, H={net.provenance.hidden} "
                           f"but its weights take C={cfg.in_channels}, H={cfg.input_dim}; the file is inconsistent")
    if dtype is not None or device != "cpu":
        net.to(device=device, dtype=dtype)
    log.info("loaded AlignNet %s (%s fusion, fits %s)", os.fspath(path), cfg.fusion, net.fits)
    return net


def _published_layout(nested: Mapping, config, source: str):
    """The published ``{'config', 'state_dict'}`` torch file -> (tensors, config: the one given, else its own)."""
    if "state_dict" not in nested:
        raise X2IFileError(
            f"{source} is not an AlignNet: a dict with keys {sorted(nested)[:6]} "
            "(expected the published {'config', 'state_dict'} layout or a bare state dict)"
        )
    tensors = nested["state_dict"]
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise X2IFileError(f"{source}: 'state_dict' is not a mapping of tensors")
    if config is None and "config" in nested:
        config = nested["config"]
    return tensors, config


def _resolve_config(config, meta, sd, source: str) -> AlignNetConfig:
    """The config: given (object, dict, preset name or JSON file), else our file's metadata, else inferred from
    the weights' shapes."""
    if config is None and meta and "config" in meta:
        if meta.get("x2i_format") not in (None, FORMAT_TAG):
            raise X2IFileError(
                f"{source} is an X2I '{meta.get('x2i_format')}' file, not an AlignNet"
            )
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError as exc:
            raise X2IFileError(f"{source}: metadata 'config' is not valid JSON ({exc})") from exc
    if isinstance(config, str):
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as fh:
                config = json.load(fh)
        else:
            config = AlignNetConfig.preset(config)
    if config is None:
        return infer_config(sd, source)
    if isinstance(config, AlignNetConfig):
        return config
    return AlignNetConfig.from_dict(config, source)


def convert_alignnet(src: str | os.PathLike, dst: str | os.PathLike, config=None) -> AlignNet:
    """Published torch file (or bare state dict + config) -> our safetensors."""
    net = load_alignnet(src, config)
    net.save(dst)
    return net
