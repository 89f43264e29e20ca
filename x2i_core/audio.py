"""Audio for audio-capable MLLMs: ComfyUI ``AUDIO`` values, files, mono down-mix and resampling.

Nothing here needs torchaudio.  Resampling is band-limited windowed-sinc
interpolation (a Hann-windowed sinc low-pass evaluated at the output phases,
applied as one strided convolution), the same filter family torchaudio uses by
default, so results agree with ``torchaudio.functional.resample`` to float
round-off when torchaudio is installed (tested) and stay identical when it is
not.
"""

from __future__ import annotations

import dataclasses
import math
import os
import wave
from typing import Any

import numpy as np
import torch

from .errors import X2IInputError

MAX_AUDIO_SECONDS = 300.0


@dataclasses.dataclass
class AudioClip:
    """``samples [channels, T]`` float32 in -1..1 at ``sample_rate`` Hz."""

    samples: torch.Tensor
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[-1] / float(self.sample_rate)


def _check_rate(rate: Any, name: str) -> int:
    try:
        r = int(rate)
    except (TypeError, ValueError):
        raise X2IInputError(f"{name}: sample rate {rate!r} is not a number; expected a rate in Hz such as 16000") from None
    if r <= 0 or r != rate and float(rate) != float(r):
        raise X2IInputError(f"{name}: sample rate {rate!r} is invalid; expected a positive whole number of Hz")
    return r


def as_clip(audio: Any, name: str = "audio") -> AudioClip:
    """An :class:`AudioClip`, a ComfyUI ``AUDIO`` dict (first item of its batch), ``(array, rate)`` or a file path."""
    if isinstance(audio, AudioClip):
        clip = audio
    elif isinstance(audio, dict):
        if "waveform" not in audio or "sample_rate" not in audio:
            raise X2IInputError(f"{name}: expected ComfyUI AUDIO {{'waveform', 'sample_rate'}}, found keys {sorted(audio)}")
        wav = torch.as_tensor(audio["waveform"])
        if wav.dim() == 3:
            if wav.shape[0] != 1:
                raise X2IInputError(f"{name}: an AUDIO batch of {wav.shape[0]} clips; use one clip per audio input "
                                    "(split the batch, or connect each clip to its own turn)")
            wav = wav[0]
        clip = AudioClip(wav, _check_rate(audio["sample_rate"], name))
    elif isinstance(audio, (tuple, list)) and len(audio) == 2 and not isinstance(audio[1], (list, tuple, np.ndarray)):
        clip = AudioClip(torch.as_tensor(np.asarray(audio[0])), _check_rate(audio[1], name))
    elif isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__"):
        clip = load_audio_file(audio)
    else:
        raise X2IInputError(f"{name}: expected ComfyUI AUDIO, an (array, sample_rate) pair or a file path, "
                            f"found {type(audio).__name__}")
    wav = clip.samples
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise X2IInputError(f"{name}: waveform shaped {tuple(clip.samples.shape)}; expected [channels, samples]")
    if wav.shape[0] > 32 and wav.shape[1] <= 32:
        wav = wav.t()  # [samples, channels] given
    if wav.shape[-1] == 0:
        raise X2IInputError(f"{name} is empty (0 samples); expected at least a fraction of a second of sound")
    if not wav.is_floating_point():
        info = torch.iinfo(wav.dtype)
        wav = wav.double() / float(max(abs(info.min), info.max))
    wav = wav.float()
    if not torch.isfinite(wav).all():
        raise X2IInputError(f"{name} contains NaN or infinite samples")
    return AudioClip(wav, clip.sample_rate)


def to_mono(samples: torch.Tensor) -> torch.Tensor:
    """``[channels, T]`` -> ``[T]`` (mean of the channels)."""
    return samples.mean(dim=0) if samples.dim() == 2 else samples


def _sinc_kernels(orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99, dtype=torch.float64):
    base = min(orig, new) * rolloff
    half = math.ceil(width_zeros * orig / base)
    taps = torch.arange(-half, half + orig, dtype=dtype) / orig
    phases = -torch.arange(new, dtype=dtype)[:, None] / new
    x = (phases + taps[None, :]) * base
    x = x.clamp(-width_zeros, width_zeros)
    window = torch.cos(x * math.pi / width_zeros / 2) ** 2
    x = x * math.pi
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / torch.where(x == 0, torch.ones_like(x), x))
    return (sinc * window * (base / orig))[:, None, :], half


def _resample_direct(flat: torch.Tensor, orig: int, new: int, target: int, width_zeros: int = 6,
                     rolloff: float = 0.99, chunk: int = 1 << 16) -> torch.Tensor:
    """The same windowed-sinc filter as :func:`_sinc_kernels`, evaluated at each output instant directly
    (``2 * half + 2`` taps per output) - for rate pairs whose polyphase bank would hold ``new`` kernels of
    ``orig`` taps each (a prime rate such as 7919 Hz)."""
    base = min(orig, new) * rolloff
    half = math.ceil(width_zeros * orig / base)
    length = flat.shape[-1]
    offsets = torch.arange(-half, half + 2)
    out = flat.new_empty(flat.shape[0], target)
    for lo in range(0, target, chunk):
        n = torch.arange(lo, min(target, lo + chunk), dtype=torch.int64)
        first = torch.div(n * orig, new, rounding_mode="floor")
        idx = first[:, None] + offsets[None, :]
        x = (idx.to(flat.dtype) / orig - n.to(flat.dtype)[:, None] / new) * base
        x = x.clamp(-width_zeros, width_zeros)
        window = torch.cos(x * math.pi / width_zeros / 2) ** 2
        x = x * math.pi
        sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / torch.where(x == 0, torch.ones_like(x), x))
        weights = sinc * window * (base / orig) * ((idx >= 0) & (idx < length))
        out[:, lo:lo + len(n)] = (flat[:, idx.clamp(0, length - 1)] * weights[None]).sum(-1)
    return out


def resample(samples: torch.Tensor, orig_rate: int, new_rate: int, direct: bool | None = None) -> torch.Tensor:
    """Band-limited resampling of ``[..., T]`` from ``orig_rate`` to ``new_rate`` Hz (a Hann-windowed sinc,
    as torchaudio's default).  Common rate pairs use a polyphase filter bank; pairs whose bank would be
    large (``direct`` None: more than 4M taps, e.g. a prime rate) evaluate the filter per output sample."""
    if orig_rate == new_rate:
        return samples
    if int(orig_rate) <= 0 or int(new_rate) <= 0:
        raise X2IInputError(f"audio sample rate {orig_rate} Hz -> {new_rate} Hz: expected positive rates")
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    shape = samples.shape
    flat = samples.reshape(-1, shape[-1]).to(torch.float64)
    length = flat.shape[-1]
    target = math.ceil(new * length / orig)
    if direct is None:
        direct = new * (orig + 2 * math.ceil(6 * orig / (min(orig, new) * 0.99))) > 4_000_000
    if direct:
        return _resample_direct(flat, orig, new, target).reshape(*shape[:-1], target).to(samples.dtype)
    kernels, half = _sinc_kernels(orig, new)
    padded = torch.nn.functional.pad(flat[:, None, :], (half, half + orig))
    out = torch.nn.functional.conv1d(padded, kernels, stride=orig)  # [N, new, frames]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    return out[:, :target].reshape(*shape[:-1], target).to(samples.dtype)


def prepare_audio(audio: Any, rate: int, name: str = "audio", max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Any accepted audio -> mono float32 numpy at ``rate`` Hz (what feature extractors take)."""
    clip = as_clip(audio, name)
    if clip.seconds > max_seconds:
        raise X2IInputError(f"{name} is {clip.seconds:.0f} s long; at most {max_seconds:.0f} s are encoded - "
                            "trim it (e.g. with an audio trim node) or raise the limit")
    mono = to_mono(clip.samples)
    return resample(mono, clip.sample_rate, rate).numpy().astype(np.float32)


def load_audio_file(path: Any) -> AudioClip:
    """Read an audio file: PCM WAV with the standard library; other formats via torchaudio or PyAV when present."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise X2IInputError(f"audio file '{path}' does not exist")
    try:
        with wave.open(path, "rb") as wf:
            n, width, rate, ch = wf.getnframes(), wf.getsampwidth(), wf.getframerate(), wf.getnchannels()
            raw = wf.readframes(n)
        if width == 1:
            data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width in (2, 4):
            data = np.frombuffer(raw, "<i2" if width == 2 else "<i4").astype(np.float64) / float(2 ** (8 * width - 1))
        elif width == 3:
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            data = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float64) / float(1 << 23)
        else:
            raise X2IInputError(f"audio file '{path}' has {8 * width}-bit samples; expected 8/16/24/32-bit PCM")
        return AudioClip(torch.from_numpy(data.reshape(-1, ch).T.astype(np.float32).copy()), rate)
    except (wave.Error, EOFError):
        pass
    try:
        import torchaudio  # optional

        wav, rate = torchaudio.load(path)
        return AudioClip(wav, int(rate))
    except Exception:  # noqa: BLE001 - missing, broken or refusing: try the next reader
        pass
    try:
        import av  # optional (ComfyUI ships it)

        with av.open(path) as container:
            stream = container.streams.audio[0]
            frames = [f.to_ndarray().astype(np.float32) for f in container.decode(stream)]
            rate = stream.rate
        data = np.concatenate(frames, axis=-1)
        if data.ndim == 1:
            data = data[None]
        return AudioClip(torch.from_numpy(data), int(rate))
    except Exception as exc:  # noqa: BLE001
        raise X2IInputError(f"audio file '{path}' could not be decoded ({exc}); expected PCM WAV, or install "
                            "torchaudio / PyAV for other formats") from None
