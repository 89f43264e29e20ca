"""The core X2I nodes: MLLM loader / encode, AlignNet loader / project, X2I sampler."""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import node_helpers
import nodes as comfy_nodes
from comfy_api.latest import io

from ..x2i_core.mllm.base import EncodeRequest
from ..x2i_core.registry import MLLMIdentity, check_fits, families_with, labels
from . import paths
from .common import (
    CATEGORY,
    PRESET_OPTIONS,
    PRESET_TOOLTIP,
    NodeError,
    check_finite,
    has_any,
    image_resolution_input,
    media_inputs,
    node_media,
    pad_rows_input,
    run_mllm,
    search_aliases,
    user_errors,
    video_resolution_input,
)
from .models import load_managed_alignnet, load_managed_mllm
from .types import ALIGNNET, CHAT, HIDDEN, MLLM

log = logging.getLogger("x2i")

DEFAULT_PRESET = PRESET_OPTIONS[0]


class X2IMLLMLoader(io.ComfyNode):
    DISPLAY = "X2I MLLM Loader"  # the name users see, and every error's prefix

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IMLLMLoader", **search_aliases("X2IMLLMLoader"),
            display_name=cls.DISPLAY,
            category=f"{CATEGORY}/loaders",
            description=f"Loads a multimodal LLM (a Hugging Face model folder in models/mllm: {labels()}) as X2I's "
                        "prompt encoder; the family is read from its config.json.",
            inputs=[
                io.Combo.Input("model_name", options=paths.list_mllm_dirs(),
                               tooltip="A Hugging Face model folder under models/mllm (e.g. Qwen2.5-VL-7B-Instruct); "
                                       "folders with a config.json are listed."),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto",
                               tooltip="Weights dtype. auto = bf16 on GPU, fp32 on CPU."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="default = ComfyUI's text-encoder device (offloaded when memory is needed); "
                                       "cpu = always run on the CPU."),
                io.Combo.Input("quantization", options=["none", "int8", "bnb8", "bnb4"], default="none", optional=True,
                               tooltip="none = the dtype above. int8 = weight-only int8 decoder (CPU or GPU, nothing "
                                       "to install; ~half of bf16's weight memory). bnb8 / bnb4 = bitsandbytes 8-bit / "
                                       "4-bit NF4 (CUDA only, pip install bitsandbytes; the model then stays on the GPU)."),
                io.Boolean.Input("offload_after_encode", default=False, optional=True,
                                 tooltip="Move the MLLM off the GPU right after each encode, leaving all VRAM to FLUX "
                                         "(re-loaded on the next encode). Off = ComfyUI offloads it when memory is "
                                         "needed."),
                io.Boolean.Input("trust_remote_code", default=False, optional=True,
                                 tooltip="No supported MLLM needs it: every family loads from its config, "
                                         "tokenizer and safetensors files alone. ON makes "
                                         f"{labels(families_with(remote_code_option=True), last=' and ')} run the "
                                         "Python files shipped inside its model folder instead, with your rights: "
                                         "enable only for folders from a source you trust whose .py files you have "
                                         "read."),
                io.Combo.Input("cpu_matmul", options=["auto", "torch", "onednn"], default="auto", optional=True,
                               tooltip="How the decoder multiplies when the MLLM runs on the CPU. onednn = weights "
                                       "packed once for oneDNN (about 2x faster encodes of short prompts in fp32; the "
                                       "model then stays on the CPU). torch = plain nn.Linear. auto = onednn for an "
                                       "fp32 MLLM on the CPU, else torch."),
            ],
            outputs=[MLLM.Output(display_name="mllm", tooltip="The loaded MLLM, managed by ComfyUI.")],
        )

    @classmethod
    def execute(cls, model_name, dtype="auto", device="default", quantization="none", offload_after_encode=False,
                trust_remote_code=False, cpu_matmul="auto") -> io.NodeOutput:
        with user_errors(cls.DISPLAY):
            path = paths.resolve_mllm_dir(model_name)
            return io.NodeOutput(load_managed_mllm(path, model_name, dtype, device, trust_remote_code, quantization,
                                                   offload_after_encode, cpu_matmul))


class X2IMLLMEncode(io.ComfyNode):
    DISPLAY = "X2I MLLM Encode"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IMLLMEncode", **search_aliases("X2IMLLMEncode"),
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description="Runs the MLLM once over the prompt - text in any language, images, video, audio, any mix, "
                        "optionally after a chat - and returns all its hidden states for an AlignNet.",
            inputs=[
                MLLM.Input("mllm", tooltip="From X2I MLLM Loader."),
                io.String.Input("text", multiline=True, default="", tooltip="The prompt, any language. May be empty "
                                "when media are given (or when a chat's last turn is the prompt)."),
                io.Combo.Input("preset", options=PRESET_OPTIONS, default=DEFAULT_PRESET, tooltip=PRESET_TOOLTIP),
                image_resolution_input(),
                # Inputs added after the first release are optional, so older API prompts still validate.
                io.String.Input("instruction", multiline=True, default="", optional=True,
                                tooltip="Optional editing instruction for image+text editing: fills the reference's "
                                        "'Instruction editing description' field (empty = the preset's default)."),
                video_resolution_input(optional=True),
                *media_inputs(resolution=False, optional_widgets=True),
                io.Combo.Input("sparse_prefill", options=["off", "auto", "on"], default="off", optional=True,
                               tooltip="CritiPrefill sparse attention for long inputs (documents, many images, "
                                       "video, long chats): approximate, faster. auto = only for inputs of 4096+ "
                                       "tokens; on = always; off = exact dense attention."),
                pad_rows_input(),
                CHAT.Input("chat", optional=True,
                           tooltip="Optional conversation from X2I Chat Turn nodes; this node's text/media become "
                                   "the final user turn (or, when empty, the chat's last user turn is the prompt)."),
            ],
            outputs=[HIDDEN.Output(display_name="hidden", tooltip="MLLM hidden states [1, layers+1, tokens, width].")],
        )

    @classmethod
    def execute(cls, mllm, text="", preset=DEFAULT_PRESET, image_resolution=0, instruction="", video_resolution=0,
                video_fps=1.0, max_frames=768, frames_fps=24.0, sparse_prefill="off", image=None, video=None,
                frames=None, audio=None, chat=None, pad_rows="reference") -> io.NodeOutput:
        node = cls.DISPLAY
        # frames are resized as they decode only for encoders whose video size that widget sets (the Qwen-style
        # recipes); MiniCPM-o resizes each frame as an image, from the full frame, as the reference did
        fit = getattr(mllm.encoder, "video_decode_fit", True)
        media = node_media(node, text, image, video, frames, audio, video_fps=video_fps, max_frames=max_frames,
                           frames_fps=frames_fps, video_resolution=video_resolution if fit else None)
        history = tuple(chat or ())
        if chat is not None and not history:
            raise NodeError(f"{node}: the connected chat has no turns; add an X2I Chat Turn with text or media")
        if not has_any(text, media) and not history:
            raise NodeError(f"{node}: the prompt is empty - type some text or connect an image, video or audio")
        if not has_any(text, media) and history[-1].role != "user":
            raise NodeError(f"{node}: the chat ends with an assistant turn and this node adds no text or media; "
                            "type the next user message here or end the chat with a user turn")
        req = EncodeRequest(text=text if (text or "").strip() else None, instruction=instruction or None,
                            history=history, **media)
        with run_mllm(mllm, node):
            hs = mllm.encoder.encode(req, preset=preset, image_size=image_resolution or None,
                                     video_size=video_resolution or None, prefill=sparse_prefill,
                                     pad_rows=pad_rows)
        hs.hidden = hs.hidden.to(mm.intermediate_device())
        hs.source_path = mllm.path
        return io.NodeOutput(hs)


class X2IAlignNetLoader(io.ComfyNode):
    DISPLAY = "X2I AlignNet Loader"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IAlignNetLoader", **search_aliases("X2IAlignNetLoader"),
            display_name=cls.DISPLAY,
            category=f"{CATEGORY}/loaders",
            description="Loads an AlignNet (the X2I projector MLLM -> FLUX text space) from models/x2i: our "
                        "safetensors or the published .pt files.",
            inputs=[
                io.Combo.Input("alignnet_name", options=paths.list_x2i_files("alignnet"),
                               tooltip="An AlignNet file in models/x2i (.safetensors or the published .pt; "
                                       "read weights-only, never executing code). LightControl files are not "
                                       "listed (each file's own header says what it is)."),
            ],
            outputs=[ALIGNNET.Output(display_name="alignnet", tooltip="The loaded AlignNet.")],
        )

    @classmethod
    def execute(cls, alignnet_name) -> io.NodeOutput:
        with user_errors(cls.DISPLAY):
            return io.NodeOutput(load_managed_alignnet(paths.resolve_x2i_file(alignnet_name, "alignnet"),
                                                       alignnet_name))


def project(hs, alignnet, guidance: float | None = 3.5, node: str = "X2I AlignNet Project"):
    """Hidden states -> stock FLUX CONDITIONING ``[[seq, {"pooled_output", "guidance"}]]`` (errors name ``node``)."""
    cfg = alignnet.net.config
    if (hs.channels, hs.hidden_size) != (cfg.in_channels, cfg.input_dim):
        src = getattr(hs, "source_path", None) or hs.mllm
        raise NodeError(
            f"{node}: AlignNet '{alignnet.name}' expects hidden states of "
            f"{alignnet.net.fits}, but MLLM '{os.path.basename(str(src))}' "
            f"produced C={hs.channels}, H={hs.hidden_size}. Load the AlignNet trained for this MLLM."
        )
    # Same dimensions: the MLLM family and the pad-row semantics it was trained with (an X2IShapeError).
    check_fits(alignnet.net.provenance, cfg.in_channels, cfg.input_dim,
               MLLMIdentity(hs.family, os.path.basename(str(getattr(hs, "source_path", None) or hs.mllm)),
                            hs.channels, hs.hidden_size), f"AlignNet '{alignnet.name}'", hs.pad_rows)
    alignnet.net.check_hidden(hs.hidden, hs.mllm, f"AlignNet '{alignnet.name}'")  # NaN/Inf: an X2IInputError
    alignnet.load()
    p = next(alignnet.net.parameters())
    with torch.no_grad():
        pooled, seq = alignnet.net(hs.hidden.to(device=p.device, dtype=p.dtype))
    if not (torch.isfinite(seq).all() and torch.isfinite(pooled).all()):
        raise NodeError(f"{node}: AlignNet '{alignnet.name}' produced NaN or infinite values from "
                        "finite hidden states; the file's weights are damaged - download or convert it again")
    out_dev = mm.intermediate_device()
    extra = {"pooled_output": pooled.float().to(out_dev)}
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[seq.float().to(out_dev), extra]]


class X2IAlignNetProject(io.ComfyNode):
    DISPLAY = "X2I AlignNet Project"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="X2IAlignNetProject", **search_aliases("X2IAlignNetProject"),
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description="Turns MLLM hidden states into a stock FLUX CONDITIONING (sequence in T5's place, pooled "
                        "vector in CLIP's). Works with KSampler, FluxGuidance, ConditioningZeroOut, Apply ControlNet.",
            inputs=[
                HIDDEN.Input("hidden", tooltip="From X2I MLLM Encode."),
                ALIGNNET.Input("alignnet", tooltip="From X2I AlignNet Loader; must be trained for the same MLLM."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX guidance stored in the conditioning (FLUX-dev: 3.5)."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="FLUX conditioning.")],
        )

    @classmethod
    def execute(cls, hidden, alignnet, guidance=3.5) -> io.NodeOutput:
        check_finite(cls.DISPLAY, guidance=guidance)
        with user_errors(cls.DISPLAY):
            return io.NodeOutput(project(hidden, alignnet, guidance, cls.DISPLAY))


def check_conditioning(node: str, conditioning) -> None:
    """A FLUX CONDITIONING (list of [seq, {pooled_output, ...}]) with finite tensors, or a NodeError."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise NodeError(f"{node}: the conditioning is empty; expected a FLUX CONDITIONING such as X2I AlignNet "
                        "Project's output")
    for i, item in enumerate(conditioning):
        seq, extra = item[0], item[1] if len(item) > 1 else {}
        for what, t in (("sequence", seq), ("pooled_output", extra.get("pooled_output"))):
            if isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
                raise NodeError(f"{node}: conditioning {i + 1} has NaN or infinite values in its {what} "
                                f"(shape {tuple(t.shape)}); expected finite numbers - check the node that made it")


def _zero_out(conditioning):
    out = []
    for seq, extra in conditioning:
        d = dict(extra)
        if d.get("pooled_output") is not None:
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(seq), d])
    return out


class X2ISampler(io.ComfyNode):
    DISPLAY = "X2I Sampler"

    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="X2ISampler", **search_aliases("X2ISampler"),
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description="One-node FLUX sampling with X2I's defaults: guidance in the conditioning, cfg 1, "
                        "an empty latent of the given size, decode with the VAE.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX model (stock UNETLoader / checkpoint, LoRAs welcome)."),
                io.Vae.Input("vae", tooltip="The FLUX VAE."),
                io.Conditioning.Input("conditioning", tooltip="From X2I AlignNet Project."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=28, min=1, max=200,
                             tooltip="Sampling steps: FLUX-dev 28, FLUX-schnell / shuttle-3 4."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX guidance (FLUX-dev 3.5; ignored by schnell)."),
                io.Int.Input("width", default=1024, min=16, max=comfy_nodes.MAX_RESOLUTION, step=16,
                             tooltip="Image width, a multiple of 16."),
                io.Int.Input("height", default=1024, min=16, max=comfy_nodes.MAX_RESOLUTION, step=16,
                             tooltip="Image height, a multiple of 16."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler (the reference uses FLUX's flow-matching Euler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Noise schedule."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Strength of the optional control_net (e.g. X2I LightControl); 0 = off."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="Optional: X2I LightControl (or any CONTROL_NET) for instruction edits."),
                io.Image.Input("source_image", optional=True,
                               tooltip="The image being edited; the control_net's hint."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, vae, conditioning, seed=0, steps=28, guidance=3.5, width=1024, height=1024,
                sampler_name="euler", scheduler="simple", control_strength=1.0, control_net=None,
                source_image=None) -> io.NodeOutput:
        if width % 16 or height % 16:
            raise NodeError(f"{cls.DISPLAY}: width and height must be multiples of 16, got {width}x{height}")
        if (control_net is None) != (source_image is None):
            raise NodeError(f"{cls.DISPLAY}: connect both control_net and source_image, or neither")
        check_finite(cls.DISPLAY, guidance=guidance, control_strength=control_strength, source_image=source_image)
        check_conditioning(cls.DISPLAY, conditioning)
        positive = node_helpers.conditioning_set_values(conditioning, {"guidance": float(guidance)})
        if control_net is not None:
            from .comfy_lightcontrol import apply_lightcontrol

            positive = apply_lightcontrol(positive, control_net, source_image, float(control_strength))
        negative = _zero_out(conditioning)  # cfg 1: FLUX-dev skips the negative, KSampler still wants one
        latent = torch.zeros([1, 16, height // 8, width // 8], device=mm.intermediate_device())
        (out,) = comfy_nodes.common_ksampler(model, seed, steps, 1.0, sampler_name, scheduler, positive, negative,
                                             {"samples": latent})
        images = vae.decode(out["samples"])
        if images.dim() == 5:  # video VAEs return [B, T, H, W, C]
            images = images.reshape(-1, *images.shape[-3:])
        return io.NodeOutput(images, out)


NODES = [X2IMLLMLoader, X2IMLLMEncode, X2IAlignNetLoader, X2IAlignNetProject, X2ISampler]
