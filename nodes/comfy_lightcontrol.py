"""LightControl as a stock ComfyUI ``CONTROL_NET``.

``LightControlNet`` subclasses ComfyUI's ``ControlBase``: the stock Apply
ControlNet node gives strength, start/end percent and chaining; its modules
are a managed model returned from ``get_models()`` so they load with the UNet.
Its residuals go to ``control["input"][i]``, which ComfyUI's FLUX adds to the
image tokens after double block ``i``.
"""

from __future__ import annotations

import torch

import comfy.controlnet
import comfy.model_management as mm
import comfy.utils

from ..x2i_core.lightcontrol import load_lightcontrol
from .common import NodeError
from .models import managed


class LightControlNet(comfy.controlnet.ControlBase):
    def __init__(self, patcher, name: str):
        super().__init__()
        self.patcher = patcher
        self.name = name
        self.compression_ratio = 8  # pixels per latent cell; the hint is resized to the latent size x 8

    @property
    def module(self):
        return self.patcher.model.inner

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return control_prev
        p = next(self.module.parameters())
        h, w = x_noisy.shape[-2] * self.compression_ratio, x_noisy.shape[-1] * self.compression_ratio
        if self.cond_hint is None or self.cond_hint.shape[-2:] != (h, w):
            if not bool(torch.isfinite(self.cond_hint_original).all()):  # else a "successful" black image
                raise NodeError(f"X2I LightControl '{self.name}': the control image (the source image given to "
                                "Apply ControlNet or X2I Sampler) contains NaN or infinite values; expected floats "
                                "in 0..1. Check the node that made it.")
            hint = comfy.utils.common_upscale(self.cond_hint_original[:, :3], w, h, self.upscale_algorithm, "center")
            self.cond_hint = (hint * 2.0 - 1.0).to(device=p.device, dtype=p.dtype)
        hint = self.cond_hint
        if hint.shape[0] != x_noisy.shape[0]:
            hint = comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)
        sigma = t.to(device=p.device, dtype=torch.float32).reshape(-1)
        if sigma.shape[0] != x_noisy.shape[0]:
            sigma = sigma[:1].expand(x_noisy.shape[0])
        with torch.no_grad():
            residuals = self.module(hint, sigma * 1000.0)
        residuals = [r.to(x_noisy.device) for r in residuals]
        return self.control_merge({"input": residuals, "middle": [], "output": []}, control_prev, x_noisy.dtype)

    def copy(self):
        c = LightControlNet(self.patcher, self.name)
        self.copy_to(c)
        c.compression_ratio = self.compression_ratio
        return c

    def get_models(self):
        return super().get_models() + [self.patcher]

    def inference_memory_requirements(self, dtype):
        return super().inference_memory_requirements(dtype) + comfy.model_management.module_size(self.module)


def load_lightcontrol_net(path: str, name: str) -> LightControlNet:
    """A LightControl file as a managed CONTROL_NET (its X2I errors reach the calling node's ``user_errors``)."""
    module = load_lightcontrol(path)
    return LightControlNet(managed(module, mm.get_torch_device(), mm.unet_offload_device()), name)


def apply_lightcontrol(conditioning, control_net, image, strength: float, start: float = 0.0, end: float = 1.0):
    """What the stock Apply ControlNet does, for the X2I Sampler's optional input."""
    if strength == 0 or control_net is None or image is None:
        return conditioning
    out = []
    for seq, extra in conditioning:
        d = dict(extra)
        c = control_net.copy().set_cond_hint(image.movedim(-1, 1), strength, (start, end))
        c.set_previous_controlnet(d.get("control"))
        d["control"] = c
        d["control_apply_to_uncond"] = False
        out.append([seq, d])
    return out
