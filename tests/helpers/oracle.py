"""Running a helper script on the reference's own software stack, beside this environment's torch:
``.refstack`` (transformers 4.49.0, tokenizers 0.21.0, qwen-vl-utils 0.0.10 - ``make refstack``) for Qwen2.5-VL,
``.refstack-minicpmo`` (transformers 4.48.0, tokenizers 0.21.0 - ``make refstack-minicpmo``) for MiniCPM-o."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5  # fp32 agreement with the reference stack


STACKS = {".refstack": "refstack", ".refstack-minicpmo": "refstack-minicpmo"}  # side folder -> make target


def refstack(folder_name: str = ".refstack") -> str:
    """The side folder, built first if missing."""
    folder = os.path.join(ROOT, folder_name)
    if not any(n.startswith(".x2i-ref-") for n in (os.listdir(folder) if os.path.isdir(folder) else [])):
        subprocess.run(["make", "-C", ROOT, STACKS[folder_name], f"PY={sys.executable}"], check=True)
    return folder


def run_on_refstack(helper: str, *args, timeout: float = 900, stack: str = ".refstack",
                    env: dict | None = None) -> subprocess.CompletedProcess:
    """``python helper *args`` with a reference stack first on the path; fails the test on a non-zero exit."""
    env = dict(os.environ, **(env or {}), PYTHONPATH=refstack(stack), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, helper, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r
