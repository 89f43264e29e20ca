"""The install a ComfyUI user gets, replayed: ComfyUI-Manager installs ``requirements.txt`` one line at a time
(``pip install LINE`` each, never resolved together) into the host's Python.  Two fresh venvs stand for the two
kinds of host - a current one (transformers 5.24, huggingface-hub 2.4) and a 2025 one (transformers 4.57,
huggingface-hub 0.36) - and after the replay ``pip check`` must be clean, no package may have moved down, and
``import transformers`` must still work.  Then the library's own one-command install
(``pip install -r requirements/library.txt``, README) on top: still clean, nothing down, and diffusers imports.

No torch is needed (the requirement files never name it); the venvs download from the package registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.install_replay]

SEEDS = {
    "current": ["transformers==5.24.0", "huggingface-hub==2.4.0"],
    "2025": ["transformers==4.57.6", "huggingface-hub==0.36.2"],
}


def manager_lines(path: str) -> list[str]:
    """The lines ComfyUI-Manager would install: stripped, no comments, no blanks."""
    with open(path, encoding="utf-8") as fh:
        lines = [line.split("#", 1)[0].strip() for line in fh]
    return [line for line in lines if line]


def _pip(py: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run([py, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=1200)


def _versions(py: str) -> dict[str, str]:
    done = _pip(py, "list", "--format=json")
    assert done.returncode == 0, done.stderr
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(done.stdout)}


def _moved_down(before: dict[str, str], after: dict[str, str]) -> list[str]:
    from packaging.version import Version

    return [f"{name} {old} -> {after.get(name, 'removed')}" for name, old in sorted(before.items())
            if name not in after or Version(after[name]) < Version(old)]


def test_requirement_lines_hold_no_cap_on_the_hosts_hub_stack():
    for line in manager_lines(os.path.join(ROOT, "requirements.txt")):
        name = line.split(";")[0]
        for pkg in ("transformers", "tokenizers", "huggingface-hub", "huggingface_hub"):
            if name.lower().startswith(pkg):
                assert "<" not in name and "==" not in name and "~=" not in name, \
                    f"requirements.txt line {line!r} caps {pkg}: a Manager install would downgrade a current host"
        assert not name.lower().startswith(("torch", "torchvision", "torchaudio", "diffusers")), line


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_manager_style_install_keeps_the_host_working(seed, tmp_path):
    venv = tmp_path / "host"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    done = _pip(py, "install", "--quiet", *SEEDS[seed])
    assert done.returncode == 0, done.stderr[-3000:]
    seeded = _versions(py)
    for line in manager_lines(os.path.join(ROOT, "requirements.txt")):  # one pip call per line, as the Manager
        done = _pip(py, "install", line)
        assert done.returncode == 0, f"pip install {line!r} failed:\n{done.stderr[-3000:]}"
        assert "incompatible" not in done.stderr, f"pip install {line!r} broke the host:\n{done.stderr[-3000:]}"
    check = _pip(py, "check")
    assert check.returncode == 0, f"{seed} host after the Manager-style install:\n{check.stdout}{check.stderr}"
    after = _versions(py)
    assert not _moved_down(seeded, after), _moved_down(seeded, after)
    assert after["transformers"] == seeded["transformers"] and after["huggingface-hub"] == seeded["huggingface-hub"]
    probe = subprocess.run([py, "-c", "import transformers, tokenizers, safetensors, numpy, PIL, tqdm; "
                                      "from transformers import AutoProcessor, CLIPTokenizer"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]

    # The library's one-command install (README) on top of that host.
    done = _pip(py, "install", "--quiet", "-r", os.path.join(ROOT, "requirements", "library.txt"))
    assert done.returncode == 0, done.stderr[-3000:]
    check = _pip(py, "check")
    assert check.returncode == 0, f"{seed} host after requirements/library.txt:\n{check.stdout}{check.stderr}"
    final = _versions(py)
    assert not _moved_down(after, final), _moved_down(after, final)
    assert final["transformers"] == seeded["transformers"]
    probe = subprocess.run([py, "-c", "import transformers, diffusers, huggingface_hub, yaml; "
                                      "print(diffusers.__version__, huggingface_hub.__version__)"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
