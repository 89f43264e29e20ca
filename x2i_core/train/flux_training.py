"""What the two FLUX trainers (LoRA, LightControl) share: images to VAE latents, FLUX's 2x2 latent packing,
the flow-matching draws and the training forward with its loss.

Flow matching as FLUX was trained: ``x_t = (1 - s) x0 + s e`` with target ``e - x0`` (the velocity), sigmas
``s = sigmoid(u)``, ``u ~ N(mean, std)`` (logit-normal).  Packing and position ids are diffusers' own
(``FluxPipeline._pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``).  The draws take
one generator per (seed, step, sample) so a resumed run draws what an uninterrupted one would; diffusers'
``compute_density_for_timestep_sampling`` draws the same distribution but rounds ``u`` differently in the
last bit, so it is not used (resumes must stay bitwise).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .base import Trainer
from .distributed import step_generator

VAE_SCALE = 8  # FLUX's VAE: 8x fewer pixels per side


def fit_to(img, size):
    """Resize a PIL image to cover ``size`` (width, height) and centre-crop it."""
    from PIL import Image

    tw, th = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((nw, nh), resample=Image.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def to_pixels(img, size) -> torch.Tensor:
    """A PIL image fitted to ``size`` as a [3, H, W] float tensor in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.asarray(fit_to(img, size), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@torch.no_grad()
def vae_latent(vae, pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    """[3, H, W] pixels -> the [C, H/8, W/8] latent FLUX trains on (mode, shifted and scaled), fp32 on the CPU."""
    lat = vae.encode(pixels[None].to(device, dtype)).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0
    return ((lat - shift) * vae.config.scaling_factor)[0].float().cpu()


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4] (FLUX's 2x2 patches, row-major)."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``h`` x ``w``."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(x, h * VAE_SCALE, w * VAE_SCALE, VAE_SCALE)


def draw_noise_and_sigma(seed: int, step: int, index: int, shape, mean: float, std: float):
    """The noise and the logit-normal sigma of one sample of one step (one generator, noise drawn first)."""
    g = step_generator(seed, step, index)
    noise = torch.randn(shape, generator=g)
    u = torch.randn((), generator=g) * float(std) + float(mean)
    return noise, torch.sigmoid(u)


def fixed_noise(seed: int, round_: int, index: int, shape) -> torch.Tensor:
    """The noise of an evaluation: fixed per (seed, round, sample), so every evaluation sees the same."""
    return torch.randn(shape, generator=step_generator(seed, round_, index))


def flow_matching_loss(model, flux_config, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       seq: torch.Tensor, pooled: torch.Tensor, guidance: float, dtype: torch.dtype,
                       context=None) -> torch.Tensor:
    """MSE between FLUX's velocity at ``x_t`` and ``noise - x0``.

    ``model`` is the transformer as it is called (a DDP wrapper while training), ``flux_config`` its
    config; ``seq`` [B, S, 4096] and ``pooled`` [B, 768] the conditioning; ``guidance`` is fed to the
    guidance embedder when FLUX has one; ``context`` an optional context manager around the call (e.g.
    LightControl's residual injection).  Inputs and the call run in ``dtype`` under autocast when it is
    not fp32; the loss is fp32."""
    b, _, h, w = x0.shape
    device = x0.device
    from diffusers import FluxPipeline

    s = sigma[:, None, None, None]
    xt = (1 - s) * x0 + s * noise
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(seq.shape[1], 3, device=device, dtype=dtype)
    g = (torch.full((b,), float(guidance), device=device, dtype=dtype) if flux_config.guidance_embeds else None)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with amp, (context if context is not None else contextlib.nullcontext()):
        pred = model(hidden_states=pack_latents(xt).to(dtype), timestep=sigma.to(dtype), guidance=g,
                     pooled_projections=pooled.to(device, dtype), encoder_hidden_states=seq.to(device, dtype),
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return torch.nn.functional.mse_loss(unpack_latents(pred.float(), h, w), (noise - x0).float())


def stack(items: list[dict], key: str, device, dtype=None) -> torch.Tensor:
    """``torch.stack`` of one cached field over a batch of items, moved (and cast) for the forward."""
    out = torch.stack([it[key] for it in items]).to(device)
    return out if dtype is None else out.to(dtype)


class FluxTrainer(Trainer):
    """The shape of a trainer on frozen FLUX under frozen X2I conditioning (LoRA, LightControl): cached
    conditionings, per-sample draws, one loss, and a fixed-noise evaluation before and after training.
    A subclass sets ``trained`` (the module whose train/eval mode the evaluation toggles) and implements
    :meth:`loss`."""

    eval_seed = 12345             # the evaluation's fixed noise
    eval_sigmas = (0.25, 0.5, 0.75)
    trained: torch.nn.Module

    @torch.no_grad()
    def condition(self, text: str, images=None) -> tuple[torch.Tensor, torch.Tensor]:
        """X2I's conditioning of a caption (+ images): ``(pooled [768], sequence [S, 4096])`` on the CPU."""
        from ..mllm.base import EncodeRequest

        hs = self.encoder.encode(EncodeRequest(text=text, images=images or None), preset=self.cfg.preset)
        pooled, seq = self.alignnet(hs.hidden)
        return pooled[0].cpu(), seq[0].cpu()

    def draws(self, step: int, first: int, n: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise [n, *shape] and sigmas [n] of samples ``first .. first+n-1`` at ``step``, on the device."""
        pairs = [draw_noise_and_sigma(self.cfg.seed, step, first + k, shape, self.tcfg.sigma_mean,
                                      self.tcfg.sigma_std) for k in range(n)]
        return (torch.stack([p[0] for p in pairs]).to(self.device),
                torch.stack([p[1] for p in pairs]).to(self.device))

    def loss(self, items: list[dict], x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
             train: bool = True) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self) -> float:
        """The loss on every training sample at fixed sigmas and fixed noise (a steady yardstick)."""
        was_training = self.trained.training
        self.trained.eval()
        total = []
        try:
            for i, it in enumerate(self.items):
                x0 = it["latent"][None].to(self.device)
                for j, s in enumerate(self.eval_sigmas):
                    noise = fixed_noise(self.eval_seed, j, i, x0.shape[1:])[None].to(self.device)
                    total.append(float(self.loss([it], x0, noise, torch.tensor([s], device=self.device), train=False)))
        finally:
            self.trained.train(was_training)
        return sum(total) / len(total)

    def _eval_start(self, start: int):
        return self.eval_loss()


__all__ = ["FluxTrainer", "draw_noise_and_sigma", "fit_to", "fixed_noise", "flow_matching_loss", "pack_latents", "stack",
           "to_pixels", "unpack_latents", "vae_latent"]
