"""Pieces shared by the pack's nodes: errors shown on a node, progress/Cancel over the MLLM, and the
conversion of stock ComfyUI media (IMAGE batches, VIDEO, IMAGE frame batches with a frame rate, AUDIO)
into what the X2I encoders take."""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..x2i_core import registry
from ..x2i_core.errors import X2IError, X2IInputError
from ..x2i_core.media import VIDEO_FPS, VIDEO_MAX_FRAMES, decode_sampled_frames, sample_frames
from ..x2i_core.mllm.prompting import token_budget_setting
from ..x2i_core.prompt import DEFAULT_PRESET, PRESETS, SPECS

DEFAULT_VIDEO_SIDE = int(SPECS["comfyui"].video_max_pixels ** 0.5)  # the presets' 128 x 128 per frame

log = logging.getLogger("x2i")

CATEGORY = "X2I"
PRESET_OPTIONS = [DEFAULT_PRESET, *PRESETS]
PRESET_TOOLTIP = (
    "How the MLLM prompt is built (the reference code's three conventions). auto = 'training' for text-only "
    "prompts (what the AlignNet was trained on: instruction dict, left padding to 512) and 'comfyui' with media "
    "(reference ComfyUI nodes: media first, images with a 224x224 budget, video 128x128 at 1 fps, right padding "
    "to max(1.3x length, 512)); 'scripts' = plain text, images resized to 128x128, right padding to 512."
)


# What the node search finds each node by, besides its name (ComfyUI >= 0.3.7x's search_aliases; older hosts have
# no such field and get none).
SEARCH_ALIASES = {
    "X2IMLLMLoader": ["qwen", "qwen2.5-vl", "internvl", "qwen omni", "minicpm", "mllm loader", "vlm loader",
                      "multimodal model"],
    "X2IMLLMEncode": ["qwen", "qwen2.5-vl", "internvl", "omni", "multimodal", "mllm", "image prompt",
                      "video prompt", "audio", "audio prompt", "any prompt", "multilingual", "screenshot", "x2i"],
    "X2IAlignNetLoader": ["alignnet", "x2i projector", "qwen proj"],
    "X2IAlignNetProject": ["alignnet", "projector", "flux conditioning", "mllm to flux"],
    "X2ISampler": ["flux sampler", "x2i generate", "image edit", "x2i"],
    "X2ILightControlLoader": ["lightcontrol", "controlnet", "image edit", "instruction edit"],
    "X2IChatTurn": ["chat", "multi-turn", "conversation", "dialogue"],
    "X2IMLLMReason": ["reasoning", "think", "answer", "riddle", "question", "qwen"],
    "X2ICLIPEncode": ["qwen clip", "native qwen", "text encoder", "qwen image", "image prompt"],
    "X2IBlendConditioning": ["blend", "mix conditioning", "t5 blend", "conditioning average"],
}


def search_aliases(node_id: str) -> dict:
    """``search_aliases=`` for ``io.Schema`` where the host's schema has the field."""
    import dataclasses as _dc

    fields = {f.name for f in _dc.fields(io.Schema)} if _dc.is_dataclass(io.Schema) else set()
    return {"search_aliases": list(SEARCH_ALIASES[node_id])} if "search_aliases" in fields else {}


class NodeError(RuntimeError):
    """An error shown on the node in ComfyUI; the message is the whole story."""


def check_finite(node: str, **values) -> None:
    """Refuse NaN / infinite numbers and images on ``node`` by input name. ComfyUI's widget validation lets NaN
    through (every comparison with NaN is false), and a NaN guidance or hint samples a "successful" black image."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NodeError(f"{node}: {name} contains NaN or infinite values; expected finite numbers "
                                "(images: floats in 0..1). Check the node that made it.")
        elif not np.isfinite(float(value)):
            raise NodeError(f"{node}: {name} must be a finite number, got {value}")


@contextlib.contextmanager
def user_errors(node: str):
    try:
        yield
    except X2IError as exc:
        raise NodeError(f"{node}: {exc}") from None


def tower_blocks(model) -> list:
    """The blocks of a model's vision / audio towers (every ``ModuleList`` under a module named visual, vision or
    audio): Cancel is checked before each, so a large image or a long clip stops within one block."""
    if model is None:
        return []
    blocks = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.ModuleList) and any(k in name for k in ("visual", "vision", "audio", "vpm",
                                                                                 "apm")) and leaf in (
                "blocks", "layers", "layer", "merger_list"):
            blocks.extend(module)
    return blocks


class _NodeNotes(logging.Handler):
    """The pack's warnings while a node runs (a cut prompt, dropped chat turns, a video's frame claim), kept to
    show on the node."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        with contextlib.suppress(Exception):
            self.lines.append(record.getMessage())


def show_on_node(lines: list[str]) -> None:
    """Show ``lines`` on the running node in the frontend (ComfyUI's progress text), where the host has it."""
    if not lines:
        return
    with contextlib.suppress(Exception):
        from server import PromptServer

        server = PromptServer.instance
        node_id = getattr(server, "last_node_id", None)
        if node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text("\n".join(lines[-4:]), node_id, getattr(server, "client_id", None))


@contextlib.contextmanager
def run_mllm(mllm, node: str):
    """Load the managed MLLM, then run the body with a progress bar and Cancel over its decoder layers, its
    vision / audio tower blocks and the prompt side (per image, before the processor); user errors as node
    errors, out-of-memory turned into advice, and the pack's warnings shown on the node."""
    mllm.load()
    encoder = mllm.encoder
    layers = getattr(encoder, "decoder_layers", None)
    handles = []
    if layers is not None:
        pbar = comfy.utils.ProgressBar(len(layers))

        def hook(module, args):
            mm.throw_exception_if_processing_interrupted()
            pbar.update(1)

        handles = [layer.register_forward_pre_hook(hook) for layer in layers]

    def cancel_check(module=None, args=None):
        mm.throw_exception_if_processing_interrupted()

    handles += [b.register_forward_pre_hook(cancel_check) for b in tower_blocks(getattr(encoder, "model", None))]
    had_check = "interrupt_check" in vars(encoder)
    encoder.interrupt_check = cancel_check
    notes = _NodeNotes()
    log.addHandler(notes)
    try:
        with user_errors(node):
            yield
    except torch.OutOfMemoryError:
        mm.soft_empty_cache(True)
        raise NodeError(
            f"{node}: out of memory while running '{mllm.name}'. Try dtype fp16/bf16 in the loader, device cpu, "
            "a smaller image/video resolution, fewer images or frames, shorter audio, or a smaller MLLM") from None
    finally:
        log.removeHandler(notes)
        for h in handles:
            h.remove()
        if not had_check:
            with contextlib.suppress(AttributeError):
                del encoder.interrupt_check
        if getattr(mllm, "offload_after_encode", False):
            mllm.offload()
    show_on_node(notes.lines)


# -- media inputs -------------------------------------------------------------

# Widget maxima (docs/bad-inputs.md): qwen-vl-utils' own ceilings, which the released MLLMs were made for.
IMAGE_RESOLUTION_MAX = 3584      # 16384 visual tokens (128 x 28 per side), qwen-vl-utils' MAX_PIXELS
VIDEO_RESOLUTION_MAX = 756       # 768 x 28 x 28 pixels per frame, qwen-vl-utils' VIDEO_MAX_PIXELS (27 x 28 per side)


def image_resolution_input():
    return io.Int.Input("image_resolution", default=0, min=0, max=IMAGE_RESOLUTION_MAX, step=28,
                        tooltip="0 = the preset's default (comfyui: 224x224 pixel budget; scripts: 128x128). "
                                "Otherwise pixels per side, a multiple of 28. At most 3584: 16384 visual tokens per "
                                "image, qwen-vl-utils' ceiling (a prompt's media are also checked against the "
                                "token budget before any image is processed).")


def video_resolution_input(optional: bool = False):
    opt = {"optional": True} if optional else {}
    return io.Int.Input("video_resolution", default=0, min=0, max=VIDEO_RESOLUTION_MAX, step=28, **opt,
                        tooltip="Per-frame pixel budget for video, pixels per side (a multiple of 28); 0 = the "
                                "reference's 128x128. At most 756: qwen-vl-utils caps a frame at 768 x 28 x 28 "
                                "pixels, and long clips get less per frame (90% of 128000 x 28 x 28 for the clip).")


def pad_rows_input():
    """How left-pad rows are computed (the ``training`` preset); optional, so older API prompts validate."""
    from ..x2i_core.mllm.chat import PAD_ROWS

    return io.Combo.Input("pad_rows", options=list(PAD_ROWS), default="reference", optional=True,
                          tooltip="Left padding (training preset): reference = " + PAD_ROWS["reference"]
                                  + "; constant = " + PAD_ROWS["constant"] + ".")


def media_inputs(resolution: bool = True, optional_widgets: bool = False) -> list:
    """The media widgets and optional media sockets, in the order every X2I encode node shows them.

    ``optional_widgets``: declare the widgets optional, so API prompts written before they existed still
    validate (ComfyUI shows optional widgets after the required ones)."""
    opt = {"optional": True} if optional_widgets else {}
    res = [video_resolution_input(optional_widgets)]
    return [
        *([image_resolution_input(), *res] if resolution else []),
        io.Float.Input("video_fps", default=VIDEO_FPS, min=0.05, max=30.0, step=0.05, **opt,
                       tooltip="Frames per second sampled from a video or frame batch (reference: 1)."),
        io.Int.Input("max_frames", default=VIDEO_MAX_FRAMES, min=2, max=VIDEO_MAX_FRAMES, **opt,
                     tooltip="Most frames per video. A longer clip is subsampled uniformly over its whole length "
                             f"to this many frames (not cut). At most {VIDEO_MAX_FRAMES}, qwen-vl-utils' ceiling; "
                             "the prompt's tokens are also checked against the MLLM's budget before decoding."),
        io.Float.Input("frames_fps", default=24.0, min=0.01, max=240.0, step=0.01, **opt,
                       tooltip="Frame rate of the 'frames' IMAGE batch (ignored for the VIDEO input, which "
                               "carries its own)."),
        io.Image.Input("image", optional=True,
                       tooltip="Optional images; a batch is several images, in order, in one prompt."),
        io.Video.Input("video", optional=True, tooltip="Optional video (stock Load Video)."),
        io.Image.Input("frames", optional=True,
                       tooltip="Optional video as an IMAGE frame batch (e.g. from a video loader); its frame rate "
                               "is frames_fps."),
        io.Audio.Input("audio", optional=True,
                       tooltip="Optional audio (stock Load Audio); needs an audio-capable MLLM: "
                               f"{registry.labels(registry.families_with(modality='audio'), last=' or ')}."),
    ]


def _video_frames(video, fps: float, max_frames: int, video_resolution: int | None = None) -> np.ndarray:
    """A ComfyUI VIDEO -> sampled frames ``[T, H, W, 3]`` uint8, decoding only the frames kept when it is a file.
    ``video_resolution``: the encode node's widget (0 = the presets' default), whose frame size the frames are
    resized to as they decode; None (a chat turn, encoded later at a size not known here): decoded at full size."""
    source = None
    with contextlib.suppress(Exception):
        source = video.get_stream_source()
    if isinstance(source, str) and os.path.isfile(source):
        try:
            total = int(video.get_frame_count())
            rate = float(video.get_frame_rate())
        except Exception as exc:  # noqa: BLE001 - av/container errors vary
            raise X2IInputError(f"video '{os.path.basename(source)}' could not be read ({exc})") from None
        side = None if video_resolution is None else (video_resolution or DEFAULT_VIDEO_SIDE)
        return decode_sampled_frames(source, total, rate, fps, max_frames, max_pixels=side and side * side,
                                     token_budget=token_budget_setting())
    comps = video.get_components()
    images = comps.images
    if images is None or len(images) == 0:
        raise X2IInputError("video has no frames (zero-frame video); expected at least one frame")
    rate = float(comps.frame_rate) if comps.frame_rate else 24.0
    return sample_frames(images, rate, fps, max_frames, name="video")


def collect_media(image=None, video=None, frames=None, audio=None, *, video_fps: float = VIDEO_FPS,
                  max_frames: int = VIDEO_MAX_FRAMES, frames_fps: float = 24.0, video_resolution: int | None = None) -> dict:
    """Stock ComfyUI values -> ``images`` / ``videos`` / ``audios`` for an EncodeRequest or ChatTurn."""
    out: dict = {"images": None, "videos": None, "audios": None}
    if image is not None:
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise X2IInputError("'image' must be a ComfyUI IMAGE batch [N, H, W, C]")
        out["images"] = image
    videos = []
    if video is not None:
        videos.append(_video_frames(video, video_fps, max_frames, video_resolution))
    if frames is not None:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
            raise X2IInputError("'frames' must be a ComfyUI IMAGE batch [T, H, W, C] of video frames")
        videos.append(sample_frames(frames, frames_fps, video_fps, max_frames, name="frames"))
    out["videos"] = videos or None
    if audio is not None:
        out["audios"] = [audio]
    return out


def has_any(text: str | None, media: dict) -> bool:
    return bool((text or "").strip()) or any(v is not None for v in media.values())


def node_media(node: str, text, image, video, frames, audio, *, video_fps: float, max_frames: int,
               frames_fps: float, empty: str | None = None, video_resolution: int | None = None) -> dict:
    """:func:`collect_media` with its errors shown on ``node``; ``empty``: the error when there is neither
    text nor media."""
    check_finite(node, video_fps=video_fps, frames_fps=frames_fps)
    with user_errors(node):
        media = collect_media(image, video, frames, audio, video_fps=video_fps, max_frames=max_frames,
                              frames_fps=frames_fps, video_resolution=video_resolution)
    if empty and not has_any(text, media):
        raise NodeError(f"{node}: {empty}")
    return media
