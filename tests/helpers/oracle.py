"""Running a helper script on the reference's own software stack (``.refstack``: transformers 4.49.0,
tokenizers 0.21.0, qwen-vl-utils 0.0.10 - ``make refstack``), beside this environment's torch."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5  # fp32 agreement with the reference stack


def refstack() -> str:
    """The side folder, built first if missing."""
    folder = os.path.join(ROOT, ".refstack")
    if not any(n.startswith(".x2i-ref-") for n in (os.listdir(folder) if os.path.isdir(folder) else [])):
        subprocess.run(["make", "-C", ROOT, "refstack", f"PY={sys.executable}"], check=True)
    return folder


def run_on_refstack(helper: str, *args, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python helper *args`` with the reference stack first on the path; fails the test on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=refstack(), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, helper, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r
