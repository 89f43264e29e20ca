"""LightControl: light ControlNeXt-style modules for instruction-editing fidelity (the paper's stage 2).

One module per FLUX double-stream block.  Each reads the *source* image in
pixel space ``[B, 3, 8h, 8w]`` (values in [-1, 1]) and the timestep, and
produces ``[B, D, h/2, w/2]`` - one D-wide vector per FLUX image token,
flattened row-major like FLUX's 2x2 patches - that is **added to the image
tokens after double block i** (times a scale, 1.0).

Module layout (state-dict names follow the published training code, so its
``diffusion_pytorch_model.bin`` - a ``ModuleList`` state dict ``"<i>.<name>"``
- loads unchanged): sinusoidal time projection 128 -> ``time_embedding``
(MLP to 256); ``embedding`` stem Conv(3->64, s2), GN(2), ReLU, Conv(64->64),
GN(2), ReLU, Conv(64->128), GN(2), ReLU; ``down_res`` ResNet blocks with the
time embedding (128->128 groups 4, 128->256 groups 8) each followed by a
strided-conv ``down_sample``; ``mid_convs[0]`` Conv 256->256, ReLU, GN(8),
Conv 256->256, GN(8) (residual); ``mid_convs[1]`` Conv(256 -> D, k2, s2).

The timestep each module sees is the one FLUX embeds: sigma x 1000.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import X2IFileError, X2IInputError
from .io import atomic_save_safetensors, load_weights_file

log = logging.getLogger("x2i")

FORMAT_TAG = "lightcontrol"


@dataclasses.dataclass
class LightControlConfig:
    num_modules: int = 19
    out_dim: int = 3072
    in_channels: tuple = (128, 128)
    out_channels: tuple = (128, 256)
    groups: tuple = (4, 8)
    time_embed_dim: int = 256
    scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LightControlConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise X2IFileError(f"unknown LightControl config key(s) {bad}; expected {sorted(known)}")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse a config that no module can be built from, naming the key (before anything is allocated)."""
        def positive_int(key, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise X2IFileError(f"LightControl config {key} is {value!r}; expected a whole number above 0")

        for key in ("num_modules", "out_dim", "time_embed_dim"):
            positive_int(key, getattr(self, key))
        for key in ("in_channels", "out_channels", "groups"):
            values = getattr(self, key)
            if not isinstance(values, tuple) or not values:
                raise X2IFileError(f"LightControl config {key} is {values!r}; expected a list of whole numbers")
            for v in values:
                positive_int(key, v)
        if not (len(self.in_channels) == len(self.out_channels) == len(self.groups)):
            raise X2IFileError("LightControl config in_channels, out_channels and groups differ in length "
                               f"({len(self.in_channels)}, {len(self.out_channels)}, {len(self.groups)})")
        for i, (cin, cout, g) in enumerate(zip(self.in_channels, self.out_channels, self.groups)):
            if cout % g or cin % g:
                raise X2IFileError(f"LightControl config: block {i} has in/out channels {cin}/{cout}, not divisible "
                                   f"by its groups {g}")
            want = 128 if i == 0 else self.out_channels[i - 1]
            if cin != want:
                raise X2IFileError(f"LightControl config: in_channels[{i}] is {cin}; expected {want} (what the "
                                   "previous stage gives)")
        if self.out_channels[-1] % 8:
            raise X2IFileError(f"LightControl config: the last out_channels {self.out_channels[-1]} is not divisible "
                               "by 8 (the middle block's group norm)")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise X2IFileError(f"LightControl config scale is {self.scale!r}; expected a finite number")


class SinusoidalTime(nn.Module):
    """The sinusoidal timestep projection (cos half first, frequency shift 0, max period 10000), as diffusers'
    ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` computes it; no parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t[:, None].float() * freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeMLP(nn.Module):
    """Linear -> SiLU -> Linear (the state-dict names of diffusers' ``TimestepEmbedding``)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeResBlock(nn.Module):
    """A ResNet block with an added time embedding: GN -> SiLU -> conv -> + proj(SiLU(temb)) -> GN -> SiLU ->
    conv, plus a 1x1-conv shortcut when the widths differ (the names, defaults and arithmetic of diffusers'
    ``ResnetBlock2D`` with eps 1e-6, dropout 0, output scale 1)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        act = self.nonlinearity
        h = self.conv1(act(self.norm1(x)))
        h = h + self.time_emb_proj(act(temb))[:, :, None, None]
        h = self.conv2(act(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class StridedConv(nn.Module):
    """A 3x3 stride-2 convolution under the name ``conv`` (diffusers' ``Downsample2D(use_conv=True)``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LightControlModule(nn.Module):
    """One module (the building blocks above are ours, so the ComfyUI nodes need no diffusers)."""

    def __init__(self, cfg: LightControlConfig):
        super().__init__()
        self.time_proj = SinusoidalTime(128)
        self.time_embedding = TimeMLP(128, cfg.time_embed_dim)
        self.embedding = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.GroupNorm(2, 128), nn.ReLU(),
        )
        self.down_res = nn.ModuleList()
        self.down_sample = nn.ModuleList()
        for cin, cout, g in zip(cfg.in_channels, cfg.out_channels, cfg.groups):
            self.down_res.append(TimeResBlock(cin, cout, cfg.time_embed_dim, g))
            self.down_sample.append(StridedConv(cout))
        c = cfg.out_channels[-1]
        self.mid_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, 1, 1),
                          nn.GroupNorm(8, c)),
            nn.Conv2d(c, cfg.out_dim, kernel_size=2, stride=2),
        ])

    def forward(self, hint: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``hint [B, 3, H, W]`` in [-1, 1], ``timestep [B]`` (sigma x 1000) -> ``[B, H/16 * W/16, D]``."""
        t = timestep.expand(hint.shape[0]) if timestep.dim() == 1 else timestep.reshape(1).expand(hint.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(hint.dtype))
        x = self.embedding(hint)
        for res, down in zip(self.down_res, self.down_sample):
            x = down(res(x, emb))
        x = self.mid_convs[0](x) + x
        x = self.mid_convs[1](x)
        return x.flatten(2).transpose(1, 2)


class LightControl(nn.Module):
    """The set of modules (a ``ModuleList`` whose state dict is ``"<i>.<name>"``)."""

    def __init__(self, config: LightControlConfig | Mapping[str, Any] | None = None):
        super().__init__()
        cfg = config if isinstance(config, LightControlConfig) else LightControlConfig.from_dict(config or {})
        self.config = cfg
        self.blocks = nn.ModuleList([LightControlModule(cfg) for _ in range(cfg.num_modules)])

    def state_dict(self, *args, **kwargs):  # published layout: "<i>.<name>"
        sd = super().state_dict(*args, **kwargs)
        return type(sd)((k[len("blocks."):], v) for k, v in sd.items())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict({f"blocks.{k}": v for k, v in state_dict.items()}, strict=strict, assign=assign)

    @staticmethod
    def check_hint(hint: torch.Tensor, name: str = "source image") -> None:
        if hint.dim() != 4 or hint.shape[1] != 3:
            raise X2IInputError(f"{name}: expected [B, 3, H, W], found {tuple(hint.shape)}")
        if hint.shape[2] % 16 or hint.shape[3] % 16:
            raise X2IInputError(f"{name}: height and width must be multiples of 16, found {hint.shape[3]}x{hint.shape[2]}")

    def forward(self, hint: torch.Tensor, timestep: torch.Tensor, num_blocks: int | None = None) -> list[torch.Tensor]:
        """Residuals for the first ``min(num_modules, num_blocks)`` double blocks, scaled."""
        self.check_hint(hint)
        n = len(self.blocks) if num_blocks is None else min(len(self.blocks), num_blocks)
        p = next(self.parameters())
        hint = hint.to(device=p.device, dtype=p.dtype)
        timestep = torch.as_tensor(timestep, device=p.device).to(p.dtype).reshape(-1)
        return [self.blocks[i](hint, timestep) * self.config.scale for i in range(n)]

    def save(self, path) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(sd, path, metadata={"x2i_format": FORMAT_TAG, "config": json.dumps(self.config.to_dict())})


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "controlnet."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_lightcontrol(path, config=None) -> LightControl:
    """Our safetensors (config in metadata) or the published bare ``ModuleList`` state dict."""
    source = f"LightControl file '{os.fspath(path)}'"
    loaded = load_weights_file(path, what="LightControl")
    sd = loaded.tensors
    if loaded.nested is not None:
        sd = loaded.nested.get("state_dict", loaded.nested)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise X2IFileError(f"{source} is not a LightControl (a dict without a tensor state dict)")
    sd = _strip(sd)
    meta = loaded.metadata or {}
    if meta.get("x2i_format") not in (None, FORMAT_TAG):
        raise X2IFileError(f"{source} is an X2I '{meta['x2i_format']}' file, not a LightControl")
    indices = sorted({int(k.split(".")[0]) for k in sd if k.split(".")[0].isdigit()})
    if not indices or f"{indices[0]}.mid_convs.1.weight" not in sd:
        raise X2IFileError(
            f"{source} is not a LightControl: expected tensors like '0.mid_convs.1.weight', found e.g. {sorted(sd)[:3]}")
    if config is None and "config" in meta:
        config = json.loads(meta["config"])
    if config is None:
        config = {"num_modules": len(indices), "out_dim": int(sd[f"{indices[0]}.mid_convs.1.weight"].shape[0])}
    cfg = config if isinstance(config, LightControlConfig) else LightControlConfig.from_dict(config)
    cfg.check()
    # The config is a claim: its shapes are compared with the file's tensors on the meta device (no memory) before
    # the real modules are built.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LightControl(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise X2IFileError(f"{source}: tensors do not match {cfg.to_dict()}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in sd.items():
        if tuple(v.shape) != expected[k]:
            raise X2IFileError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {expected[k]}")
    model = LightControl(cfg)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def inject(transformer, residuals: list[torch.Tensor] | None):
    """Add ``residuals[i]`` to the image tokens after diffusers FLUX double block ``i``."""
    if not residuals:
        yield
        return
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if residuals[0].shape[-1] != width:
        raise X2IInputError(f"LightControl outputs width {residuals[0].shape[-1]}, the FLUX transformer is {width} wide")

    def make(i):
        def hook(module, args, output):
            enc, hid = output
            return enc, hid + residuals[i].to(hid.dtype)
        return hook

    handles = [transformer.transformer_blocks[i].register_forward_hook(make(i))
               for i in range(min(len(residuals), len(transformer.transformer_blocks)))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
