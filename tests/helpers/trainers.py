"""Driving the three trainers through the real CLI (``python -m x2i_core ...`` in a subprocess), with the
small settings the tests share."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, env=None, timeout=900, check=True) -> subprocess.CompletedProcess:
    """``python -m x2i_core *args`` from the repository root; asserts success unless ``check`` is off."""
    r = subprocess.run([sys.executable, "-m", "x2i_core", *args], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def distill_args(tiny, captions, out, *extra, flux="flux_small"):
    return ["distill", f"mllm={tiny['mllm']}", f"flux={tiny[flux]}", f"output_dir={out}", f"data.paths=[{captions}]",
            "distill.resolution=64", "train.batch_size=2", "train.lr=1e-3", "train.warmup_steps=5", *extra]


def lightcontrol_args(tiny, data, out, *extra):
    return [f"mllm={tiny['mllm']}", f"alignnet={tiny['alignnet_safetensors']}", f"flux={tiny['flux']}",
            f"lightcontrol.init={tiny['lightcontrol']}", f"output_dir={out}", f"data.path={data}",
            "data.resolution=64", "train.lr=1e-3", "train.warmup_steps=5", *extra]


def lora_args(tiny, data, out, *extra):
    return [f"mllm={tiny['mllm']}", f"alignnet={tiny['alignnet_safetensors']}", f"flux={tiny['flux']}",
            f"output_dir={out}", f"data.path={data}", "data.resolution=64", "data.bucket_step=16", "lora.rank=8",
            "train.lr=1e-2", "train.warmup_steps=5", *extra]
