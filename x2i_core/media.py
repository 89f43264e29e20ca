"""Turning user media (PIL, numpy, torch, ComfyUI IMAGE batches) into RGB PIL images.

Also the resize rule the reference's Qwen helper (qwen-vl-utils) applies to
images and video frames before they reach the processor: sizes become
multiples of 28 within ``[min_pixels, max_pixels]`` keeping the aspect ratio.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import X2IInputError

log = logging.getLogger("x2i")

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_RATIO = 200
FRAME_FACTOR = 2


def _rgb_from_pil(img: Image.Image, name: str) -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise X2IInputError(f"{name} is zero-sized ({img.width}x{img.height}); expected an image of at least 1x1 pixels")
    if img.mode == "RGBA" or (img.mode in ("LA", "P") and "transparency" in img.info) or img.mode == "LA":
        # Same as the reference helper: composite transparency over white.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise X2IInputError(f"{name} has PIL mode {img.mode!r} that cannot be converted to RGB") from exc


def to_pil(image: Any, name: str = "image") -> Image.Image:
    """One image -> RGB PIL.  Arrays are HWC (or HW), uint8 0..255 or float 0..1."""
    if isinstance(image, Image.Image):
        return _rgb_from_pil(image, name)
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        try:
            with Image.open(image) as im:
                im.load()
                return _rgb_from_pil(im.copy(), f"{name} '{image}'")
        except FileNotFoundError as exc:
            raise X2IInputError(f"{name} file '{image}' does not exist") from exc
        except Image.DecompressionBombError as exc:
            raise X2IInputError(f"{name} file '{image}' declares more pixels than PIL opens safely ({exc}); "
                                "expected a photo-sized image - scale it down first") from None
        except (OSError, ValueError) as exc:
            raise X2IInputError(f"{name} file '{image}' is not a readable image ({exc})") from exc
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu")
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise X2IInputError(f"{name}: expected a PIL image, a path, or an HWC numpy/torch array, found {type(image).__name__}")
    arr = image
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise X2IInputError(f"{name}: expected an HWC array (height, width, channels), found shape {tuple(image.shape)}")
    h, w, c = arr.shape
    if h == 0 or w == 0:
        raise X2IInputError(f"{name} is zero-sized ({w}x{h}); expected an image of at least 1x1 pixels")
    if c not in (1, 3, 4):
        raise X2IInputError(
            f"{name} has {c} channels (shape {tuple(arr.shape)}); expected RGB (3), RGBA (4) or grayscale (1) in HWC order"
        )
    if arr.dtype == np.uint8:
        u8 = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise X2IInputError(f"{name} contains NaN or infinite values; expected floats in 0..1")
        u8 = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        top = 65535 if arr.max(initial=0) > 255 else 255
        u8 = (arr.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    else:
        raise X2IInputError(f"{name} has dtype {arr.dtype}; expected uint8 or float in 0..1")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    pil = Image.fromarray(u8[:, :, 0] if c == 1 else u8, mode=mode)
    return _rgb_from_pil(pil, name)


def image_items(images: Any, name: str = "image") -> list[tuple[Any, str]]:
    """None / one image / a list / a batched tensor ``[N, H, W, C]`` -> ``(item, label)`` per image, unconverted (a
    batch gives a view per image); labels are ``name`` for one image, ``"<name> <i>"`` in a list or batch."""
    if images is None:
        return []
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return [(images[i], f"{name} {i + 1}") for i in range(images.shape[0])]
    if isinstance(images, (list, tuple)):
        return [(im, f"{name} {i + 1}") for i, im in enumerate(images)]
    return [(images, name)]


def to_pil_list(images: Any, name: str = "image") -> list[Image.Image]:
    """None / one image / a list / a batched tensor ``[N, H, W, C]`` -> list of RGB PIL."""
    return [to_pil(im, label) for im, label in image_items(images, name)]


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """Size rounded to multiples of ``factor`` with ``min_pixels <= h*w <= max_pixels``."""
    if max(height, width) / max(1, min(height, width)) > MAX_RATIO:
        raise X2IInputError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is too extreme; "
            f"expected at most {MAX_RATIO}:1"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fit_pixels(img: Image.Image, max_pixels: int, min_pixels: int = MIN_PIXELS) -> Image.Image:
    """The reference helper's image fetch: smart-resize to a pixel budget (bicubic)."""
    h, w = smart_resize(img.height, img.width, IMAGE_FACTOR, min_pixels, max_pixels)
    return img.resize((w, h), resample=Image.BICUBIC)


VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' floor for a video frame (smaller frames are scaled up)
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def video_frame_size(height: int, width: int, frames: int, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` of every frame of a ``frames``-frame clip after :func:`video_frames`."""
    ceiling = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / frames * FRAME_FACTOR), int(VIDEO_MIN_PIXELS * 1.05))
    return smart_resize(height, width, IMAGE_FACTOR, VIDEO_MIN_PIXELS, min(max_pixels, ceiling))


def video_tokens(frames: int, height: int, width: int, max_pixels: int, fitted: bool = False) -> int:
    """Qwen2.5-VL's visual tokens for ``frames`` sampled frames of ``height`` x ``width`` under the per-frame
    budget ``max_pixels`` (frames go in pairs, one token per 28 x 28 pixels of the resized frame); ``fitted``:
    the frames already have their resized size (:class:`FittedFrames`)."""
    h, w = (height, width) if fitted else video_frame_size(height, width, max(frames, 1), max_pixels)
    return -(-frames // FRAME_FACTOR) * (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR)


def declared_image_sizes(images: Any) -> list[tuple[int, int]]:
    """``(width, height)`` of each image of :func:`to_pil_list`'s input, read from shapes and file headers without
    converting or decoding anything (a malformed item counts as 1x1: :func:`to_pil` then names what is wrong)."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return [(max(1, int(images.shape[2])), max(1, int(images.shape[1])))] * int(images.shape[0])
    out = []
    for im, _ in image_items(images):
        size = (1, 1)
        if isinstance(im, Image.Image):
            size = im.size
        elif isinstance(im, (torch.Tensor, np.ndarray)) and im.ndim in (2, 3):
            size = (int(im.shape[1]), int(im.shape[0]))
        elif isinstance(im, (str, bytes)) or hasattr(im, "__fspath__"):
            try:
                with Image.open(im) as opened:  # the header only
                    size = opened.size
            except Exception:  # noqa: BLE001 - to_pil reports it
                pass
        out.append((max(1, int(size[0])), max(1, int(size[1]))))
    return out


def declared_video(frames: Any) -> tuple[int, int, int]:
    """``(frames, height, width)`` of a clip (a ``[T, H, W, C]`` array or a list of frames), from its shapes."""
    if isinstance(frames, (torch.Tensor, np.ndarray)) and frames.ndim == 4:
        return int(frames.shape[0]), max(1, int(frames.shape[1])), max(1, int(frames.shape[2]))
    frames = list(frames)
    sizes = declared_image_sizes(frames[:1])
    w, h = sizes[0] if sizes else (1, 1)
    return len(frames), h, w


class FittedFrames(np.ndarray):
    """Frames ``[T, H, W, 3]`` uint8 already resized, at decode time, to what :func:`video_frames` gives a
    ``T``-frame clip under ``max_pixels`` (``x2i_max_pixels``); video_frames then only converts them."""

    x2i_max_pixels: int | None = None

    def __array_finalize__(self, obj):
        self.x2i_max_pixels = getattr(obj, "x2i_max_pixels", None)


def fitted_pixels(frames: Any) -> int | None:
    """The pixel budget ``frames`` were resized for at decode time (a whole :class:`FittedFrames`), else None."""
    return frames.x2i_max_pixels if isinstance(frames, FittedFrames) and frames.ndim == 4 else None


def video_frames(frames: Any, max_pixels: int, name: str = "video") -> list[Image.Image]:
    """A list of frames (or ``[T, H, W, C]`` array) -> resized RGB frames, padded to an even count by
    repeating the last frame (the model groups frames in pairs).

    The resize is the one the reference's helper (qwen-vl-utils 0.0.10 ``fetch_video``, given a video file)
    applies: one size for the clip from ``smart_resize`` with the video floor ``VIDEO_MIN_PIXELS`` and the
    ceiling ``min(max_pixels, max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / T * 2), 1.05 x floor))``, then
    torch's bicubic with antialiasing on the uint8 frames, clamped and rounded back to uint8 (what
    torchvision's tensor resize does)."""
    pils = to_pil_list(frames, f"{name} frame")
    if not pils:
        raise X2IInputError(f"{name} has no frames; expected at least one frame")
    sizes = {p.size for p in pils}
    if len(sizes) > 1:
        raise X2IInputError(f"{name}: frames differ in size ({sorted(sizes)[:3]}); expected one size for the clip")
    width, height = pils[0].size
    th, tw = video_frame_size(height, width, len(pils), max_pixels)
    if fitted_pixels(frames) == max_pixels:  # resized as it decoded, for this very budget and count
        th, tw = height, width
    out: list[Image.Image] = []
    for start in range(0, len(pils), 16):  # a few frames at a time: float copies of long clips are large
        chunk = torch.from_numpy(np.stack([np.asarray(p) for p in pils[start:start + 16]])).permute(0, 3, 1, 2)
        resized = torch.nn.functional.interpolate(chunk.float(), size=(th, tw), mode="bicubic", align_corners=False,
                                                  antialias=True)
        resized = resized.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out.extend(Image.fromarray(f) for f in resized)
    n = math.ceil(len(out) / FRAME_FACTOR) * FRAME_FACTOR
    out.extend([out[-1]] * (n - len(out)))
    return out


def as_video_list(videos: Any) -> list[Sequence[Any]]:
    """None / one video (list of frames or 4-D array) / list of videos -> list of videos."""
    if videos is None:
        return []
    if isinstance(videos, (torch.Tensor, np.ndarray)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return [videos[i] for i in range(videos.shape[0])]
        raise X2IInputError(f"video: expected frames shaped [T, H, W, C], found {tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        if not videos:
            return []
        first = videos[0]
        if isinstance(first, (list, tuple)) or (isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim == 4):
            return list(videos)
        return [list(videos)]
    raise X2IInputError(f"video: expected a list of frames or a [T, H, W, C] array, found {type(videos).__name__}")


VIDEO_FPS = 1.0          # the reference samples video at 1 frame per second
VIDEO_MIN_FRAMES = 4     # qwen-vl-utils' limits around that rate
VIDEO_MAX_FRAMES = 768


def sample_frames(frames: Any, source_fps: float, fps: float = VIDEO_FPS, max_frames: int = VIDEO_MAX_FRAMES,
                  min_frames: int = VIDEO_MIN_FRAMES, name: str = "video") -> Any:
    """Pick frames uniformly at ``fps`` from a clip recorded at ``source_fps`` (qwen-vl-utils' rule).

    The count is ``duration x fps`` clamped to ``[min_frames, min(max_frames, total)]`` and rounded down to
    an even number (as qwen-vl-utils 0.0.10, the reference's helper, does); a clip longer than
    ``max_frames / fps`` seconds is therefore subsampled uniformly to ``max_frames`` frames over its whole
    length (not cut).  ``frames`` is a ``[T, H, W, C]`` tensor/array
    or a list; the same kind is returned.
    """
    total = len(frames)
    if total == 0:
        raise X2IInputError(f"{name} has no frames; expected at least one frame")
    if not (source_fps and source_fps > 0 and math.isfinite(source_fps)):
        raise X2IInputError(f"{name}: frame rate {source_fps!r} is invalid; expected frames per second above 0")
    if not (fps and fps > 0):
        raise X2IInputError(f"{name}: sampling rate {fps!r} fps is invalid; expected above 0 (reference: 1 fps)")
    if max_frames < 1:
        raise X2IInputError(f"{name}: max_frames is {max_frames}; expected at least 1")
    if total == 1:
        return frames
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = max(FRAME_FACTOR, math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR)
    n = total / float(source_fps) * float(fps)
    n = min(min(max(n, lo), hi), total)
    n = max(FRAME_FACTOR, math.floor(n / FRAME_FACTOR) * FRAME_FACTOR)  # qwen-vl-utils 0.0.10 rounds down
    # qwen-vl-utils' float32 linspace for real clips; float64 where float32 cannot hold every index (2**24 frames)
    dtype = torch.float32 if total <= 2**24 else torch.float64
    idx = torch.linspace(0, total - 1, n, dtype=dtype).round().long().tolist()
    if isinstance(frames, torch.Tensor):
        return frames[torch.tensor(idx)]
    if isinstance(frames, np.ndarray):
        return frames[idx]
    return [frames[i] for i in idx]


def _resize_frame(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One uint8 HWC frame resized to ``(height, width)`` exactly as :func:`video_frames` does it (bicubic with
    antialiasing, clamped and rounded), so resizing at decode time and again in video_frames is the identity."""
    if arr.shape[:2] == size:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _decode_at(path: str, keep: list[int], max_pixels: int | None = None) -> tuple[list, int]:
    """Frames ``keep`` (sorted indices, repeats allowed) of the video file as RGB uint8 arrays (None where the
    file holds fewer frames), and how many frames were decoded.  ``max_pixels``: each kept frame is resized at
    once to the size :func:`video_frames` gives a ``len(keep)``-frame clip, so a long high-resolution clip never
    sits in memory at full size."""
    import av

    wanted: dict[int, list[int]] = {}
    for pos, idx in enumerate(keep):
        wanted.setdefault(idx, []).append(pos)
    out: list = [None] * len(keep)
    seen = 0
    size = None
    with av.open(path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            seen = i + 1
            if i in wanted:
                arr = frame.to_ndarray(format="rgb24")
                if max_pixels:
                    if size is None:
                        first = arr.shape[:2]
                        size = video_frame_size(first[0], first[1], len(keep), max_pixels)
                    elif arr.shape[:2] != first:
                        raise X2IInputError(f"video '{os.path.basename(path)}': frames differ in size "
                                            f"({first[1]}x{first[0]} and {arr.shape[1]}x{arr.shape[0]}); expected "
                                            "one size for the clip")
                    arr = _resize_frame(arr, size)
                for pos in wanted[i]:
                    out[pos] = arr
            if i >= keep[-1]:
                break
    return out, seen


def declared_video_size(path: str) -> tuple[int, int]:
    """``(height, width)`` the file's video stream declares (0, 0 when it declares none)."""
    import av

    try:
        with av.open(path) as container:
            ctx = container.streams.video[0].codec_context
            return int(ctx.height or 0), int(ctx.width or 0)
    except Exception:  # noqa: BLE001 - the decode reports a bad file
        return 0, 0


def decode_sampled_frames(path: str, claimed_frames: int, rate: float, fps: float = VIDEO_FPS,
                          max_frames: int = VIDEO_MAX_FRAMES, name: str | None = None,
                          max_pixels: int | None = None, token_budget: int | None = None) -> np.ndarray:
    """Sample a video file's frames as :func:`sample_frames` does, decoding only the kept ones: ``[T, H, W, 3]``.

    ``claimed_frames`` (the container's frame count, or duration x rate) is a claim, not a fact: a file that
    holds fewer frames than it says is sampled again over the frames it really decoded (never padded with
    copies of its last frame), and no index list the size of the claim is ever built.  ``max_pixels`` (the
    preset's per-frame budget): frames are resized as they decode, to the size the encoder would give them.
    ``token_budget``: the clip is refused before decoding when its frames need more visual tokens than that
    (Qwen2.5-VL's count, the fewest of the supported families)."""
    name = name or f"video '{os.path.basename(path)}'"
    if claimed_frames <= 0:
        raise X2IInputError(f"{name} has no frames")
    keep = sample_frames(range(claimed_frames), rate, fps, max_frames, name=name)
    if token_budget and max_pixels:
        h, w = declared_video_size(path)
        if h > 0 and w > 0:
            need = video_tokens(len(keep), h, w, max_pixels)
            if need > token_budget:
                raise X2IInputError(
                    f"{name}: {len(keep)} sampled frames of {w}x{h} need {need} visual tokens, more than the budget "
                    f"of {token_budget} (X2I_TOKEN_BUDGET); lower max_frames or video_fps (or video_resolution)")
    try:
        out, seen = _decode_at(path, keep, max_pixels)
        if any(f is None for f in out) and seen:
            log.warning("%s claims %d frames but holds %d; sampling the %d it holds", name, claimed_frames, seen,
                        seen)
            keep = sample_frames(range(seen), rate, fps, max_frames, name=name)
            out, _ = _decode_at(path, keep, max_pixels)
    except X2IInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - av/container errors vary
        raise X2IInputError(f"{name} could not be decoded ({exc})") from None
    got = [f for f in out if f is not None]
    if not got:
        raise X2IInputError(f"{name} decoded to no frames")
    if len(got) < len(out):
        raise X2IInputError(f"{name} decodes differently on a second read ({len(got)} of {len(out)} frames)")
    stacked = np.stack(got)
    if not max_pixels:
        return stacked
    fitted = stacked.view(FittedFrames)
    fitted.x2i_max_pixels = int(max_pixels)
    return fitted
