"""ComfyUI model management for X2I's models: MLLM and AlignNet as managed models.

Both are held inside a plain ``nn.Module`` (a transformers model cannot be a
``ModelPatcher``'s model directly) and wrapped in ``ModelPatcher`` so ComfyUI
loads them to the text-encoder device before use and offloads or frees them
under memory pressure or on ``/free``.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..x2i_core.alignnet import load_alignnet
from ..x2i_core.mllm import load_mllm, resolve_dtype
from ..x2i_core.mllm.cache import EncodeCache
from ..x2i_core.mllm.packed import resolve_cpu_matmul

log = logging.getLogger("x2i")


class _Holder(torch.nn.Module):
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def managed(module: torch.nn.Module, load_device, offload_device):
    """A ModelPatcher over ``module`` (held in a plain nn.Module) so ComfyUI loads and offloads it."""
    holder = _Holder(module)
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device,
                                            size=mm.module_size(holder))


class ManagedMLLM:
    """What travels on an ``X2I_MLLM`` socket."""

    def __init__(self, encoder, path: str, name: str, patcher, offload_after_encode: bool = False):
        self.encoder = encoder
        self.path = path
        self.name = name
        self.patcher = patcher
        self.offload_after_encode = offload_after_encode

    @property
    def channels(self) -> int:
        return self.encoder.channels

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    def load(self) -> None:
        mm.load_models_gpu([self.patcher])

    def offload(self) -> None:
        """Unload from the load device now (ComfyUI's own unload path), freeing its VRAM."""
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            lm = mm.current_loaded_models[i]
            if lm.model is self.patcher:
                lm.model_unload()
                mm.current_loaded_models.pop(i)
        mm.soft_empty_cache()


class ManagedAlignNet:
    """What travels on an ``X2I_ALIGNNET`` socket."""

    def __init__(self, net, path: str, name: str, patcher):
        self.net = net
        self.path = path
        self.name = name
        self.patcher = patcher

    def load(self) -> None:
        mm.load_models_gpu([self.patcher])


_LOCK = threading.Lock()


def _devices(device_choice: str):
    if device_choice == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def load_managed_mllm(path: str, name: str, dtype: str = "auto", device: str = "default",
                      trust_remote_code: bool = False, quant: str = "none",
                      offload_after_encode: bool = False, cpu_matmul: str = "auto") -> ManagedMLLM:
    load_device, offload_device = _devices(device)
    torch_dtype = resolve_dtype(dtype, load_device)
    if load_device.type != "cpu":
        # the model is loaded on the (CPU) offload device but runs on this one: resolve against where it runs, so
        # 'auto' does not pack it and 'onednn' is refused
        cpu_matmul = resolve_cpu_matmul(cpu_matmul, load_device, torch_dtype, quant)
    if quant in ("bnb8", "bnb4"):
        offload_device = load_device  # bitsandbytes weights cannot move between devices
    with _LOCK:
        encoder = load_mllm(path, dtype=torch_dtype, device=offload_device if quant not in ("bnb8", "bnb4")
                            else load_device, trust_remote_code=trust_remote_code, quant=quant,
                            cpu_matmul=cpu_matmul)
    encoder.cache = EncodeCache()
    patcher = managed(encoder.module, load_device, offload_device)
    log.info("X2I: loaded MLLM %s (%s, %s, matmul %s, C=%d, H=%d)", path, torch_dtype, quant, encoder.cpu_matmul,
             encoder.channels, encoder.hidden_size)
    return ManagedMLLM(encoder, path, name, patcher, offload_after_encode)


def load_managed_alignnet(path: str, name: str, device: str = "default") -> ManagedAlignNet:
    load_device, offload_device = _devices(device)
    net = load_alignnet(path)
    if load_device.type != "cpu":
        net.to(dtype=resolve_dtype("auto", load_device))
    patcher = managed(net, load_device, offload_device)
    return ManagedAlignNet(net, path, os.path.basename(path) if not name else name, patcher)
