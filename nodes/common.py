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
from ..x2i_core.prompt import DEFAULT_PRESET, PRESETS

log = logging.getLogger("x2i")

CATEGORY = "X2I"
PRESET_OPTIONS = [DEFAULT_PRESET, *PRESETS]
PRESET_TOOLTIP = (
    "How the MLLM prompt is built (the reference code's three conventions). auto = 'training' for text-only "
    "prompts (what the AlignNet was trained on: instruction dict, left padding to 512) and 'comfyui' with media "
    "(reference ComfyUI nodes: media first, images with a 224x224 budget, video 128x128 at 1 fps, right padding "
    "to max(1.3x length, 512)); 'scripts' = plain text, images resized to 128x128, right padding to 512."
)


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


@contextlib.contextmanager
def run_mllm(mllm, node: str):
    """Load the managed MLLM, then run the body with a progress bar and Cancel over its decoder layers,
    user errors as node errors and out-of-memory turned into advice."""
    mllm.load()
    layers = getattr(mllm.encoder, "decoder_layers", None)
    handles = []
    if layers is not None:
        pbar = comfy.utils.ProgressBar(len(layers))

        def hook(module, args):
            mm.throw_exception_if_processing_interrupted()
            pbar.update(1)

        handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        with user_errors(node):
            yield
    except torch.OutOfMemoryError:
        mm.soft_empty_cache(True)
        raise NodeError(
            f"{node}: out of memory while running '{mllm.name}'. Try dtype fp16/bf16 in the loader, device cpu, "
            "a smaller image/video resolution, fewer images or frames, shorter audio, or a smaller MLLM") from None
    finally:
        for h in handles:
            h.remove()
        if getattr(mllm, "offload_after_encode", False):
            mllm.offload()


# -- media inputs -------------------------------------------------------------

def image_resolution_input():
    return io.Int.Input("image_resolution", default=0, min=0, max=4096, step=28,
                        tooltip="0 = the preset's default (comfyui: 224x224 pixel budget; scripts: 128x128). "
                                "Otherwise pixels per side.")


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
    res = [io.Int.Input("video_resolution", default=0, min=0, max=4096, step=28, **opt,
                        tooltip="Per-frame pixel budget for video, pixels per side; 0 = the reference's 128x128.")]
    return [
        *([image_resolution_input(), *res] if resolution else []),
        io.Float.Input("video_fps", default=VIDEO_FPS, min=0.05, max=30.0, step=0.05, **opt,
                       tooltip="Frames per second sampled from a video or frame batch (reference: 1)."),
        io.Int.Input("max_frames", default=VIDEO_MAX_FRAMES, min=2, max=4096, **opt,
                     tooltip="Most frames per video. A longer clip is subsampled uniformly over its whole length "
                             "to this many frames (not cut)."),
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


def _video_frames(video, fps: float, max_frames: int) -> np.ndarray:
    """A ComfyUI VIDEO -> sampled frames ``[T, H, W, 3]`` uint8, decoding only the frames kept when it is a file."""
    source = None
    with contextlib.suppress(Exception):
        source = video.get_stream_source()
    if isinstance(source, str) and os.path.isfile(source):
        try:
            total = int(video.get_frame_count())
            rate = float(video.get_frame_rate())
        except Exception as exc:  # noqa: BLE001 - av/container errors vary
            raise X2IInputError(f"video '{os.path.basename(source)}' could not be read ({exc})") from None
        return decode_sampled_frames(source, total, rate, fps, max_frames)
    comps = video.get_components()
    images = comps.images
    if images is None or len(images) == 0:
        raise X2IInputError("video has no frames (zero-frame video); expected at least one frame")
    rate = float(comps.frame_rate) if comps.frame_rate else 24.0
    return sample_frames(images, rate, fps, max_frames, name="video")


def collect_media(image=None, video=None, frames=None, audio=None, *, video_fps: float = VIDEO_FPS,
                  max_frames: int = VIDEO_MAX_FRAMES, frames_fps: float = 24.0) -> dict:
    """Stock ComfyUI values -> ``images`` / ``videos`` / ``audios`` for an EncodeRequest or ChatTurn."""
    out: dict = {"images": None, "videos": None, "audios": None}
    if image is not None:
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise X2IInputError("'image' must be a ComfyUI IMAGE batch [N, H, W, C]")
        out["images"] = image
    videos = []
    if video is not None:
        videos.append(_video_frames(video, video_fps, max_frames))
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
               frames_fps: float, empty: str | None = None) -> dict:
    """:func:`collect_media` with its errors shown on ``node``; ``empty``: the error when there is neither
    text nor media."""
    check_finite(node, video_fps=video_fps, frames_fps=frames_fps)
    with user_errors(node):
        media = collect_media(image, video, frames, audio, video_fps=video_fps, max_frames=max_frames,
                              frames_fps=frames_fps)
    if empty and not has_any(text, media):
        raise NodeError(f"{node}: {empty}")
    return media
