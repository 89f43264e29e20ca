"""Standalone generation and the CLI, run as a user runs them (subprocess)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from x2i_core.errors import X2IShapeError
from x2i_core.pipeline import X2IPipeline
from x2i_core.tiny import build_alignnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "x2i_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def pipe(tiny):
    return X2IPipeline.from_paths(tiny["mllm"], tiny["alignnet"], tiny["flux"])


def test_alignnet_output_feeds_flux_prompt_embeds(pipe):
    hs = pipe.encode(__import__("x2i_core.mllm", fromlist=["EncodeRequest"]).EncodeRequest(text="a cat"))
    pooled, seq = pipe.project(hs)
    assert seq.shape == (1, 512, 4096) and pooled.shape == (1, 768)
    assert torch.isfinite(seq).all() and torch.isfinite(pooled).all()


def test_generation_is_deterministic_and_prompt_dependent(pipe):
    kw = dict(steps=2, width=64, height=48, seed=7, progress=False, output_type="np")
    a = pipe.generate("a red fox", **kw)
    b = pipe.generate("a red fox", **kw)
    c = pipe.generate("a blue whale in the deep ocean", **kw)
    assert a.shape == (48, 64, 3)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0


def test_image_prompt_generates(pipe):
    img = Image.fromarray((np.random.RandomState(0).rand(80, 120, 3) * 255).astype(np.uint8))
    out = pipe.generate("make it snowy", images=[img], steps=1, width=32, height=32, progress=False)
    assert out.size == (32, 32)


def test_mismatched_alignnet_is_refused_naming_both(tiny, tmp_path):
    wrong = build_alignnet(channels=29, hidden=3584 // 56, seed=0)
    path = tmp_path / "wrong.safetensors"
    wrong.save(path)
    with pytest.raises(X2IShapeError) as info:
        X2IPipeline.from_paths(tiny["mllm"], str(path), tiny["flux"])
    msg = str(info.value)
    assert "wrong.safetensors" in msg and "Qwen2.5-VL-tiny" in msg and "C=29" in msg and "C=3" in msg


def test_cli_generate_writes_png_of_requested_size(tiny, tmp_path):
    out = tmp_path / "gen.png"
    frame = tmp_path / "frame.png"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(frame)
    r = run_cli("generate", "--mllm", tiny["mllm"], "--alignnet", tiny["alignnet_safetensors"], "--flux", tiny["flux"],
                "--prompt", "一只红色的狐狸", "--image", str(frame), "--steps", "2", "--size", "80x48", "--seed", "3",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("gen.png")
    assert Image.open(out).size == (80, 48)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_cli_demo_produces_png(tiny, tmp_path):
    out = tmp_path / "demo.png"
    r = run_cli("demo", "--models", os.path.dirname(os.path.dirname(tiny["mllm"])), "--out", str(out),
                "--size", "64x64", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert os.path.abspath(r.stdout.strip().splitlines()[-1]) == str(out)
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("args,message", [
    (["--size", "100x64"], "multiple of 16"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--guidance", "abc"], "guidance must be a number"),
    (["--guidance", "nan"], "guidance must be a finite number"),  # NaN passed the range check: a black image
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--out-override", "{tmp}/shots.png"], "is an existing folder"),  # ran the whole job, then failed in the rename
    (["--preset", "fancy"], "invalid choice"),
    (["--out-override", "x.gif"], "must end with"),
    (["--mllm-override", "/no/such/dir"], "MLLM folder '/no/such/dir' does not exist"),
    (["--image", "/no/such.png"], "image file '/no/such.png' does not exist"),
])
def test_cli_rejects_bad_arguments_clearly(tiny, tmp_path, args, message):
    base = {"--mllm": tiny["mllm"], "--alignnet": tiny["alignnet"], "--flux": tiny["flux"], "--prompt": "x",
            "--out": str(tmp_path / "o.png")}
    (tmp_path / "shots.png").mkdir()
    extra = []
    it = iter(args)
    for flag in it:
        value = next(it)
        value = value.replace("{tmp}", str(tmp_path))
        if flag.endswith("-override"):
            base[flag[: -len("-override")]] = value
        else:
            extra += [flag, value]
    argv = ["generate"] + [a for kv in base.items() for a in kv] + extra
    r = run_cli(*argv, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_cli_reports_library_errors_without_traceback(tiny, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    r = run_cli("generate", "--mllm", tiny["mllm"], "--alignnet", str(bad), "--flux", tiny["flux"], "--prompt", "x",
                "--out", str(tmp_path / "o.png"), timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("error: AlignNet file") and "Traceback" not in r.stderr
    assert not (tmp_path / "o.png").exists()
    r = run_cli("generate", "--mllm", tiny["mllm"], "--alignnet", tiny["alignnet"], "--flux", tiny["flux"],
                "--out", str(tmp_path / "o.png"), timeout=60)
    assert r.returncode != 0 and "prompt is empty" in r.stderr


def test_cli_convert_alignnet(tiny, tmp_path):
    out = tmp_path / "a.safetensors"
    r = run_cli("convert-alignnet", tiny["alignnet"], str(out), timeout=60)
    assert r.returncode == 0, r.stderr
    from x2i_core.alignnet import load_alignnet

    a, b = load_alignnet(tiny["alignnet"]), load_alignnet(out)
    x = torch.randn(1, 3, 5, 64)
    assert torch.equal(a(x)[1], b(x)[1])
