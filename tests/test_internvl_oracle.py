"""InternVL against the reference's own stack: an original-layout InternVL2.5 folder (what the released
InternVL AlignNets were trained with), converted by ``convert-internvl`` without running its code, encodes
to the tensors the reference computes (transformers 4.49.0, its recipes; see
``tests/helpers/reference_internvl.py``), fp32, to 1e-5.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers.oracle import ROOT, TOL, run_on_refstack
from x2i_core.errors import X2IFileError, X2IInputError
from x2i_core.mllm import EncodeRequest

pytestmark = [pytest.mark.slow, pytest.mark.oracle]  # subprocesses on the 4.49 reference stack (.refstack)

HELPER = os.path.join(ROOT, "tests", "helpers", "reference_internvl.py")
TEXTS = ["A red fox jumps over a lazy dog in the snowy forest at dawn.", "一只可爱的小猫坐在窗台上",
         "An oil painting of a lighthouse on a rocky coast under a stormy sky. " * 30]  # > 512 tokens: truncated


def _oracle(*args):
    run_on_refstack(HELPER, *args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from helpers.comfy import qwen25_tokenizer_dir
    from x2i_core.convert_internvl import convert_internvl

    work = tmp_path_factory.mktemp("internvl-oracle")
    original = str(work / "InternVL2_5-tiny")
    _oracle("build", original, qwen25_tokenizer_dir())
    marker = str(work / "remote-code-ran")
    os.environ["X2I_REMOTE_CODE_MARKER"] = marker
    try:
        converted = convert_internvl(original, str(work / "InternVL2_5-tiny-hf"))
    finally:
        os.environ.pop("X2I_REMOTE_CODE_MARKER", None)
    images = []
    for i, (w, h) in enumerate([(150, 100), (90, 160)]):
        path = str(work / f"image{i}.png")
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype(np.uint8)).save(path)
        images.append(path)
    cases = [{"id": f"training-{i}", "recipe": "training", "text": t} for i, t in enumerate(TEXTS)]
    cases += [{"id": "scripts-text", "recipe": "scripts", "text": TEXTS[0]},
              {"id": "scripts-image", "recipe": "scripts", "text": "Draw this in watercolour.", "image": images[0]},
              {"id": "scripts-tall-image", "recipe": "scripts", "text": "Make it night.", "image": images[1]},
              {"id": "scripts-image-only", "recipe": "scripts", "image": images[0]}]
    out = str(work / "oracle.safetensors")
    job = str(work / "job.json")
    with open(job, "w") as fh:
        json.dump({"model": original, "cases": cases, "out": out}, fh)
    _oracle("run", job)
    with safe_open(out, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    return {"original": original, "converted": converted, "marker": marker, "t": tensors, "meta": meta,
            "cases": {c["id"]: c for c in cases}}


@pytest.fixture(scope="module")
def ours(run):
    from x2i_core.mllm import load_mllm

    return load_mllm(run["converted"], dtype="fp32")


def _request(case):
    image = Image.open(case["image"]) if case.get("image") else None
    return EncodeRequest(text=case.get("text"), images=image)


def test_conversion_ran_no_remote_code_and_kept_every_weight(run, ours):
    assert not os.path.exists(run["marker"])
    assert json.loads(run["meta"]["versions"])["transformers"] == "4.49.0"
    assert type(ours).__name__ == "InternVLEncoder" and ours.channels == 3 and ours.hidden_size == 64
    with safe_open(os.path.join(run["original"], "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(run["converted"], "model.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor("language_model.model.layers.1.mlp.up_proj.weight"),
                           b.get_tensor("model.language_model.layers.1.mlp.up_proj.weight"))
        qkv = a.get_tensor("vision_model.encoder.layers.0.attn.qkv.weight")
        assert torch.equal(qkv[32:64], b.get_tensor("model.vision_tower.encoder.layer.0.attention.k_proj.weight"))
    assert ours.model.config.image_token_id == 151667


@pytest.mark.parametrize("case_id", ["training-0", "training-1", "training-2", "scripts-text", "scripts-image",
                                     "scripts-tall-image", "scripts-image-only"])
def test_internvl_recipes_equal_the_reference_stack(run, ours, case_id):
    case, t = run["cases"][case_id], run["t"]
    batch, _, _ = ours.prepare([_request(case)], preset=case["recipe"])
    assert torch.equal(batch["input_ids"], t[f"{case_id}.input_ids"]), case_id
    assert torch.equal(batch["attention_mask"], t[f"{case_id}.attention_mask"]), case_id
    if case.get("image"):
        assert (batch["pixel_values"] - t[f"{case_id}.pixel_values"]).abs().max().item() <= 1e-5
    hs = ours.encode(_request(case), preset=case["recipe"])
    ref = t[f"{case_id}.hidden"]
    assert hs.hidden.shape == ref.shape == (1, 3, 512, 64)
    diff = (hs.hidden - ref).abs().max().item()
    print(f"{case_id}: max abs diff {diff:.2e}")
    assert diff <= TOL, f"{case_id}: max abs diff {diff}"


def test_mask_derived_positions_would_not_match(run, ours):
    """The earlier behaviour (positions from the mask, pads at 1) changes every pad row."""
    case_id = "training-0"
    batch, _, _ = ours.prepare([_request(run["cases"][case_id])], preset="training")
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        out = ours.model(**batch, position_ids=positions, output_hidden_states=True, use_cache=False)
    old = torch.stack(out.hidden_states, dim=1)
    ref = run["t"][f"{case_id}.hidden"]
    n = int(mask.sum())
    assert (old[:, :, :n] - ref[:, :, :n]).abs().max().item() <= TOL  # real rows agree
    assert (old[:, :, n:] - ref[:, :, n:]).abs().max().item() > 1e-2   # pad rows do not


def test_converter_refuses_what_it_cannot_convert_safely(run, tmp_path):
    from x2i_core.cli import main
    from x2i_core.convert_internvl import convert_internvl

    with pytest.raises(X2IFileError, match="exists"):
        convert_internvl(run["original"], run["converted"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        with open(os.path.join(run["original"], name), "rb") as src, open(pickled / name, "wb") as dst:
            dst.write(src.read())
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(X2IFileError, match="safetensors only"):
        convert_internvl(str(pickled), str(tmp_path / "out"))
    with pytest.raises(X2IInputError, match="internvl_chat"):
        convert_internvl(run["converted"], str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out2")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert main(["convert-internvl", run["original"], str(tmp_path / "via-cli")]) == 0
    assert os.path.isfile(tmp_path / "via-cli" / "model.safetensors")
