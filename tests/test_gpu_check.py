"""The prepared GPU check cannot rot: its dry run (every step on this CPU, tiny shapes) passes here."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    with open(results, "rb") as fh:
        before = hashlib.sha256(fh.read()).hexdigest()
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "PY": sys.executable})  # the stack under test, not whichever venv exists
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "gpu_check.json", encoding="utf-8") as fh:
        report = json.load(fh)
    steps = report["results"]
    assert set(steps) == {"loss", "encode", "quant", "critiprefill", "oracle", "distill", "flux"}
    assert all(s["status"] == "ok" for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    assert report["env"]["dry_run"] is True
    # figures that would be wrong if a step measured nothing
    assert steps["distill"]["data"]["pairs"] > 0
    assert all(v <= 1e-5 for case in steps["oracle"]["data"].values() for v in case.values())
    assert 0.99 < steps["quant"]["data"]["int8"]["cosine_last_layer"] <= 1.0
    md = (tmp_path / "gpu_check.md").read_text(encoding="utf-8")
    assert "dry run" in md and "**failed**" not in md
    with open(results, "rb") as fh:  # a dry run never writes the results file
        assert hashlib.sha256(fh.read()).hexdigest() == before
