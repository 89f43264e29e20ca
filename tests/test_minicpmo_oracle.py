"""MiniCPM-o read from its files, against the reference repository's own MiniCPM-o code on the stack it trained on.

``tests/helpers/minicpmo_reference.py`` runs in a subprocess with ``.refstack-minicpmo`` (transformers 4.48.0,
tokenizers 0.21.0; ``make refstack-minicpmo``) first on ``PYTHONPATH``.  It takes the ``minicpm/`` folder of the
reference repository (found by ``tests/helpers/reference_repo.py``; read, never committed), builds a tiny
random MiniCPM-o folder with that code, laid out as released folders are (the ``.py`` files with an
``auto_map``), and computes the reference's training and inference recipes with its own calls.  This process
loads the same folder with X2I's weights-only encoder (no remote code) on this stack's transformers and must
give the same prefill hidden states, fp32, to 1e-5, and the same mask.

Every case:

* training recipe: an English caption, a Chinese caption, a caption over 512 tokens (cut to 512);
* inference recipe: text; one image + text; a wide image alone; a tall image + text; two images (wide and
  tall) + text; one clip + text; a clip alone; two clips of different lengths + text; a 31-second clip
  (cut into 30-second pieces) + text; image + clip + text; two images + two clips + text.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers.oracle import ROOT, TOL, run_on_refstack
from helpers.reference_repo import reference_checkout
from x2i_core.mllm import EncodeRequest, load_mllm

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

HELPER = os.path.join(ROOT, "tests", "helpers", "minicpmo_reference.py")
LONG = " ".join(["A very long caption about a red fox in a snowy forest at dawn, with pine trees."] * 40)
IMAGES = {"square": (120, 110), "wide": (300, 80), "tall": (70, 260)}
CLIPS = {"clip2s": 2.5, "clip07s": 0.7, "clip31s": 31.0}


def _cases(files):
    img, aud = files["images"], files["audios"]
    return [
        {"id": "training-en", "recipe": "training", "text": "A red fox jumps over a lazy dog in the snowy forest."},
        {"id": "training-zh", "recipe": "training", "text": "一只可爱的小猫坐在窗台上，阳光明媚。"},
        {"id": "training-over-512", "recipe": "training", "text": LONG},
        {"id": "text", "recipe": "minicpm", "text": "An oil painting of a lighthouse under a stormy sky."},
        {"id": "image-text", "recipe": "minicpm", "text": "Draw this in watercolour.", "images": [img["square"]]},
        {"id": "wide-image", "recipe": "minicpm", "images": [img["wide"]]},
        {"id": "tall-image-text", "recipe": "minicpm", "text": "A poster of it.", "images": [img["tall"]]},
        {"id": "two-images-text", "recipe": "minicpm", "text": "Combine these.", "images": [img["wide"], img["tall"]]},
        {"id": "audio-text", "recipe": "minicpm", "text": "Paint what you hear.", "audios": [aud["clip2s"]]},
        {"id": "audio", "recipe": "minicpm", "audios": [aud["clip2s"]]},
        {"id": "two-audios-text", "recipe": "minicpm", "text": "Both sounds.", "audios": [aud["clip2s"], aud["clip07s"]]},
        {"id": "long-audio-text", "recipe": "minicpm", "text": "The scene.", "audios": [aud["clip31s"]]},
        {"id": "image-audio-text", "recipe": "minicpm", "text": "This place, this sound.", "images": [img["square"]],
         "audios": [aud["clip07s"]]},
        {"id": "mixed", "recipe": "minicpm", "text": "All of it.", "images": [img["wide"], img["tall"]],
         "audios": [aud["clip07s"], aud["clip2s"]]},
    ]


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    ref = reference_checkout("minicpm")
    if ref is None:
        pytest.skip("the reference repository OPPO-Mente-Lab/X2I is not on this machine and cannot be cloned "
                    "(set X2I_REFERENCE_REPO to a checkout)")
    from helpers.comfy import qwen25_tokenizer_dir

    work = tmp_path_factory.mktemp("minicpmo-oracle")
    files = {"images": {}, "audios": {}}
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        rng = np.random.RandomState(10 + i)
        path = str(work / f"{name}.png")
        Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(path)
        files["images"][name] = path
    for i, (name, seconds) in enumerate(CLIPS.items()):
        t = np.arange(int(seconds * 16000)) / 16000
        rng = np.random.RandomState(20 + i)
        clip = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.randn(len(t))
        path = str(work / f"{name}.npy")
        np.save(path, clip.astype(np.float32))
        files["audios"][name] = path
    cases = _cases(files)
    job = str(work / "job.json")
    with open(job, "w", encoding="utf-8") as fh:
        json.dump({"cases": cases}, fh)
    folder, result = str(work / "MiniCPM-o-tiny-ref"), str(work / "reference.safetensors")
    run_on_refstack(HELPER, os.path.join(ref, "minicpm"), folder, qwen25_tokenizer_dir(), job, result,
                    stack=".refstack-minicpmo", env={"HF_MODULES_CACHE": str(work / "hf-modules")}, timeout=1200)
    return {"folder": folder, "result": result, "cases": {c["id"]: c for c in cases}, "work": work}


@pytest.fixture(scope="module")
def ours(oracle_run):
    return load_mllm(oracle_run["folder"], dtype="fp32")


def _request(case):
    images = [Image.open(p).convert("RGB") for p in case.get("images", [])] or None
    audios = [(np.load(p), 16000) for p in case.get("audios", [])] or None
    return EncodeRequest(text=case.get("text"), images=images, audios=audios)


CASE_IDS = ["training-en", "training-zh", "training-over-512", "text", "image-text", "wide-image", "tall-image-text",
            "two-images-text", "audio-text", "audio", "two-audios-text", "long-audio-text", "image-audio-text", "mixed"]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_weights_only_encoder_equals_the_reference_code(oracle_run, ours, case_id):
    case = oracle_run["cases"][case_id]
    assert ours.from_files
    with safe_open(oracle_run["result"], "pt") as f:
        ref, ref_mask = f.get_tensor(case_id), f.get_tensor(case_id + ".mask")
    preset = "training" if case["recipe"] == "training" else "auto"
    hs = ours.encode(_request(case), preset=preset)
    assert tuple(hs.hidden.shape) == tuple(ref.shape), (case_id, hs.hidden.shape, ref.shape)
    assert torch.equal(hs.attention_mask, ref_mask)
    err = (hs.hidden - ref).abs().max().item()
    print(f"[minicpmo oracle] {case_id}: {tuple(ref.shape)} max |diff| {err:.2e}")
    assert err <= TOL, (case_id, err)
    if case_id == "training-over-512":
        assert ref.shape[2] == 512 and int(ref_mask.sum()) == 512


def test_the_reference_folder_has_the_released_layout(oracle_run):
    folder = oracle_run["folder"]
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    assert cfg["model_type"] == "minicpmo" and cfg["auto_map"]["AutoModel"] == "modeling_minicpmo.MiniCPMO"
    assert {"modeling_minicpmo.py", "processing_minicpmo.py", "resampler.py"} <= set(os.listdir(folder))
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"vpm.embeddings.position_embedding.weight", "resampler.attn.in_proj_weight", "apm.conv1.weight",
            "audio_projection_layer.linear1.weight", "llm.model.embed_tokens.weight"} <= keys
    meta = json.loads(safe_open(oracle_run["result"], "pt").metadata()["info"])
    # what the reference ran: SDPA in the LLM and the audio encoder, eager in the vision tower (our modules match)
    assert meta == {"audio_attn": "sdpa", "vision_attn": "eager", "llm_attn": "sdpa"}


TRAP = "open({marker!r}, 'a').write(__name__ + '\\n')\nraise ImportError('x2i trap: {name} was imported')\n"


def test_no_python_file_of_the_folder_is_imported(oracle_run, tmp_path, monkeypatch):
    """Every .py of a MiniCPM-o folder is a trap; the weights-only load and an image + audio + text encode never
    touch one, and transformers' modules cache stays empty."""
    folder = str(tmp_path / "MiniCPM-o-trapped")
    shutil.copytree(oracle_run["folder"], folder)
    marker = str(tmp_path / "imported.txt")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
                fh.write(TRAP.format(marker=marker, name=name))
    modules = tmp_path / "hf-modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(modules))
    before = set(sys.modules)
    enc = load_mllm(folder, dtype="fp32")
    hs = enc.encode(_request(oracle_run["cases"]["image-audio-text"]))
    assert hs.hidden.shape[1] == enc.channels
    assert not os.path.exists(marker)
    assert not [m for m in set(sys.modules) - before if "transformers_modules" in m or "minicpm" in m.lower()
                and "x2i_core" not in m]
    assert not modules.exists() or not any(modules.rglob("*.py"))
    # the trap works: the switch that does import the folder's code springs it
    from x2i_core.errors import X2IFileError

    with pytest.raises(X2IFileError, match="x2i trap"):
        load_mllm(folder, dtype="fp32", trust_remote_code=True)
    assert os.path.exists(marker)


def test_the_remote_code_switch_names_the_import_that_fails(oracle_run, tmp_path, monkeypatch):
    """The reference's code does not run on the pack's transformers; switching it on says which file and import
    failed and points to the weights-only path - never 'incomplete or corrupt'."""
    from x2i_core.errors import X2IFileError

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    with pytest.raises(X2IFileError) as exc:
        load_mllm(oracle_run["folder"], dtype="fp32", trust_remote_code=True)
    msg = str(exc.value)
    assert "remote code does not run on transformers" in msg and "Switch trust_remote_code off" in msg
    assert ".py line " in msg and "incomplete or corrupt" not in msg, msg
