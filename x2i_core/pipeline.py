"""Standalone X2I generation: MLLM -> AlignNet -> diffusers FLUX.

The AlignNet's sequence output is FLUX's ``prompt_embeds`` (T5's place) and
its pooled output FLUX's ``pooled_prompt_embeds`` (CLIP's place); sampler,
guidance and VAE are stock FLUX.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from .alignnet import AlignNet, load_alignnet
from .errors import X2IFileError, X2IInputError, X2IShapeError
from .mllm import load_mllm
from .mllm.base import EncodeRequest, HiddenStates
from .registry import check_fits, identity_of

log = logging.getLogger("x2i")


def load_flux_pipeline(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """A diffusers FLUX folder without its text encoders (X2I replaces them)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "model_index.json")):
        raise X2IFileError(
            f"FLUX folder '{path}' is not a diffusers pipeline folder (no model_index.json); "
            "expected e.g. a download of black-forest-labs/FLUX.1-dev"
        )
    from diffusers import FluxPipeline

    try:
        pipe = FluxPipeline.from_pretrained(
            path, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, torch_dtype=dtype,
        )
    except (OSError, ValueError) as exc:
        raise X2IFileError(f"FLUX folder '{path}' cannot be loaded ({exc})") from exc
    return pipe.to(device)


def parse_size(size: str | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise X2IInputError(f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        w, h = (int(p) for p in parts)
    else:
        w, h = (int(v) for v in size)
    for name, v in (("width", w), ("height", h)):
        if v < 16 or v % 16:
            raise X2IInputError(f"{name} {v} must be a positive multiple of 16 (FLUX packs 2x2 latent patches)")
        if v > MAX_SIDE:
            raise X2IInputError(f"{name} {v} is more than {MAX_SIDE} pixels, the largest side ComfyUI's own nodes "
                                "take (MAX_RESOLUTION); FLUX was trained up to about 2 megapixels")
    return w, h


MAX_SIDE = 16384  # ComfyUI's MAX_RESOLUTION: the same ceiling as the stock latent nodes


class X2IPipeline:
    def __init__(self, encoder, alignnet: AlignNet, flux, alignnet_name: str = "AlignNet"):
        self.encoder = encoder
        self.alignnet = alignnet
        self.flux = flux
        self.alignnet_name = alignnet_name
        self._check_pair()

    @classmethod
    def from_paths(cls, mllm: str, alignnet: str, flux: str, *, device: str = "cpu", dtype: str = "auto",
                   alignnet_config: Any = None, trust_remote_code: bool = False,
                   quant: str = "none", cpu_matmul: str = "auto") -> "X2IPipeline":
        dev = torch.device(device)
        from .mllm import resolve_dtype

        torch_dtype = resolve_dtype(dtype, dev)
        net = load_alignnet(alignnet, alignnet_config, dtype=torch_dtype, device=dev)
        enc = load_mllm(mllm, dtype=torch_dtype, device=dev, trust_remote_code=trust_remote_code, quant=quant,
                        cpu_matmul=cpu_matmul)
        flux_pipe = load_flux_pipeline(flux, dtype=torch_dtype, device=dev)
        return cls(enc, net, flux_pipe, alignnet_name=f"AlignNet '{alignnet}'")

    def _check_pair(self) -> None:
        cfg = self.alignnet.config
        check_fits(getattr(self.alignnet, "provenance", None), cfg.in_channels, cfg.input_dim,
                   identity_of(self.encoder), self.alignnet_name)
        if self.flux is not None:
            tcfg = self.flux.transformer.config
            if (cfg.output_dim1, cfg.output_dim0) != (tcfg.joint_attention_dim, tcfg.pooled_projection_dim):
                raise X2IShapeError(
                    f"{self.alignnet_name} outputs sequence width {cfg.output_dim1} and pooled width {cfg.output_dim0}, "
                    f"but the FLUX transformer expects {tcfg.joint_attention_dim} and {tcfg.pooled_projection_dim}"
                )

    def encode(self, requests: EncodeRequest | Sequence[EncodeRequest], preset: str | None = None,
               prefill: Any = None, pad_rows: str | None = None) -> HiddenStates:
        """``pad_rows`` None = what the AlignNet records it was trained with, else the encoder's default."""
        if pad_rows is None:
            prov = getattr(self.alignnet, "provenance", None)
            pad_rows = prov.pad_rows if prov is not None and prov.pad_rows else None
        return self.encoder.encode(requests, preset, prefill=prefill, pad_rows=pad_rows)

    def project(self, hs: HiddenStates) -> tuple[torch.Tensor, torch.Tensor]:
        self.alignnet.check_hidden(hs.hidden, hs.mllm, self.alignnet_name)
        with torch.no_grad():
            return self.alignnet(hs.hidden)

    def generate(self, text: str | None = None, images: Any = None, videos: Any = None, *, preset: str | None = None,
                 steps: int = 28, guidance: float = 3.5, seed: int = 0, width: int = 1024, height: int = 1024,
                 progress: bool = True, output_type: str = "pil", audios: Any = None, instruction: str | None = None,
                 prefill: Any = None, pad_rows: str | None = None):
        if steps < 1:
            raise X2IInputError(f"steps must be at least 1, found {steps}")
        width, height = parse_size((width, height))
        hs = self.encode(EncodeRequest(text=text, images=images, videos=videos, audios=audios,
                                       instruction=instruction), preset, prefill, pad_rows)
        pooled, seq = self.project(hs)
        dtype = self.flux.transformer.dtype
        device = self.flux.transformer.device
        self.flux.set_progress_bar_config(disable=not progress, desc="X2I sampling")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        out = self.flux(
            prompt_embeds=seq.to(device=device, dtype=dtype),
            pooled_prompt_embeds=pooled.to(device=device, dtype=dtype),
            num_inference_steps=int(steps), guidance_scale=float(guidance), width=width, height=height,
            generator=generator, output_type=output_type,
        )
        return out.images[0]
