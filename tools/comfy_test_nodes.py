"""Harness-only ComfyUI nodes (registered by ``tools/comfy_host.py inprocess`` when a spec asks for
``"test_nodes": true``; never part of the shipped pack).

``X2ITestTinyFluxTextEncoders`` returns a stock ComfyUI ``CLIP`` object of FLUX's own text-encoder pair
(``comfy.text_encoders.flux.flux_clip``: CLIP-L + T5-XXL, with ComfyUI's tokenizers), but one layer deep
(``real_widths`` + ``t5_layers`` / ``clip_layers``: every real width at a chosen depth, for benchmarks):
the stock ``DualCLIPLoader`` always builds the full 4.8 B-parameter T5-XXL from ComfyUI's config, which a
2-core test machine cannot run. The output widths are the real ones (T5 4096, CLIP-L pooled 768), so
the conditioning from the stock ``CLIPTextEncodeFlux`` feeds the same FLUX as X2I's (``t5_width`` other
than 4096 stands in for conditioning of another model, for error paths). Weights are random
and seeded (the values do not matter; the shapes, keys and code path do)."""

from __future__ import annotations


class X2ITestTinyFluxTextEncoders:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "t5_width": ("INT", {"default": 4096, "min": 64, "max": 8192})},
                "optional": {"real_widths": ("BOOLEAN", {"default": False}),
                             "t5_layers": ("INT", {"default": 1, "min": 1, "max": 24}),
                             "clip_layers": ("INT", {"default": 1, "min": 1, "max": 12})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed, t5_width=4096, real_widths=False, t5_layers=1, clip_layers=1):
        import torch

        import comfy.sd
        import comfy.text_encoders.flux as flux

        class Target:
            params = {}
            clip = flux.flux_clip()
            tokenizer = flux.FluxTokenizer

        # real_widths: every width of CLIP-L and T5-XXL (MLP 3072 / 10240, 12 / 64 heads), only fewer layers
        clip_l = {"hidden_size": 768, "intermediate_size": 3072 if real_widths else 64,
                  "num_hidden_layers": clip_layers, "num_attention_heads": 12, "projection_dim": 768}
        t5 = {"d_model": t5_width, "d_ff": 10240 if real_widths else 64, "num_layers": t5_layers,
              "num_heads": 64 if real_widths else 2, "d_kv": 64 if real_widths else 8}
        clip = comfy.sd.CLIP(Target, model_options={"dtype": torch.float32, "clip_l_model_config": clip_l,
                                                    "t5xxl_model_config": t5})
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for key, value in clip.cond_stage_model.state_dict().items():
            if not value.is_floating_point() or value.dim() == 0:
                sd[key] = value
            elif key.endswith(("layer_norm.weight", "layer_norm1.weight", "layer_norm2.weight",
                               "final_layer_norm.weight")):
                sd[key] = torch.ones_like(value)
            elif key.endswith(".bias"):
                sd[key] = torch.zeros_like(value)
            else:
                sd[key] = torch.randn(value.shape, generator=g) * (0.5 / value.shape[-1] ** 0.5)
        missing, unexpected = clip.cond_stage_model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"tiny FLUX text encoders: missing {missing}, unexpected {unexpected}")
        return (clip,)


NODE_CLASS_MAPPINGS = {"X2ITestTinyFluxTextEncoders": X2ITestTinyFluxTextEncoders}


def write_tiny_flux_controlnet(path: str, flux_path: str, seed: int = 0) -> None:
    """A stock-loadable FLUX ControlNet in XLabs' layout (``ControlNetLoader`` detects it by
    ``controlnet_blocks.0.weight``), one double block deep, for the tiny FLUX at ``flux_path``: built with
    ComfyUI's own ``ControlNetFlux`` from the config ComfyUI detects on that FLUX, random seeded weights.
    Runs inside a booted ComfyUI (``tools/comfy_host.py inprocess``)."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    import comfy.ldm.flux.controlnet as flux_controlnet
    import comfy.model_detection
    import comfy.ops

    config = comfy.model_detection.detect_unet_config(load_file(flux_path), "")
    net = flux_controlnet.ControlNetFlux(operations=comfy.ops.manual_cast, dtype=torch.float32, **config)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in net.state_dict().items():
        if key.endswith(("query_norm.weight", "key_norm.weight")):  # later hosts' RMSNorm; XLabs files say .scale
            key = key[: -len("weight")] + "scale"
        if key.endswith(".scale"):
            sd[key] = torch.ones_like(value)
        elif value.dim() < 2:
            sd[key] = torch.zeros_like(value)
        else:
            fan_in = value[0].numel()
            sd[key] = torch.randn(value.shape, generator=g) * (0.5 / fan_in ** 0.5)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
