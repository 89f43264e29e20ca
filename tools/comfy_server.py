"""The real ComfyUI server as a test host, and its HTTP client (dev tooling, not part of the pack).

* ``ComfyServer`` - ``main.py --cpu --listen 127.0.0.1`` on a free port, started
  from the cached source tree; ``queue(api_prompt)`` / ``wait(prompt_id)`` /
  ``run`` / ``object_info`` over HTTP.
* ``PromptRejected`` (``/prompt`` refused a prompt) and ``execution_error(entry)``
  (the node error in a finished prompt's history entry, if any).
* ``dump_object_info(path)`` - a live server's ``/object_info`` with the pack and
  the tiny models, saved as JSON (the input of ``tools/make_workflows.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from .comfy_fetch import ROOT, cache_root, ensure_comfyui, prepare_base


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
