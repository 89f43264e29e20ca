"""Fidelity against the reference's own software stack (transformers 4.49.0, tokenizers 0.21.0,
qwen-vl-utils 0.0.10), not against our own.

``tests/helpers/reference_stack.py`` runs in a subprocess with ``.refstack`` (``make refstack``) first on
``PYTHONPATH``: it builds a tiny random Qwen2.5-VL the way the released folders were saved (4.49's flat
config, the real Qwen2.5 tokenizer vocabulary that ComfyUI ships, the official chat template) and computes
the reference recipes there - the processor called exactly as the reference code calls it, then
``generate(max_new_tokens=1, output_hidden_states=True)`` prefill.  The released AlignNets were trained on
CUDA, where 4.49's SDPA path unmasks fully masked query rows (every left-pad row); on this CPU the oracle
applies that same step to the 4-D mask (``--mask cuda``, see the helper).  Our encoder (transformers 4.57)
must give the same tensors, fp32, to 1e-5.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers.oracle import ROOT, TOL, run_on_refstack
from x2i_core.media import sample_frames
from x2i_core.mllm import EncodeRequest

pytestmark = [pytest.mark.slow, pytest.mark.oracle]  # subprocesses on the 4.49 reference stack (.refstack, make refstack)

HELPER = os.path.join(ROOT, "tests", "helpers", "reference_stack.py")
TEMPLATE = os.path.join(ROOT, "tests", "data", "qwen2.5-vl-chat-template.jinja")

TEXTS = ["A red fox jumps over a lazy dog in the snowy forest at dawn.", "一只可爱的小猫坐在窗台上",
         "An oil painting of a lighthouse on a rocky coast under a stormy sky."]


def oracle(*args, timeout=900):
    return run_on_refstack(HELPER, *args, timeout=timeout)


def _image(seed, w, h):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def _clip(seed, frames, w, h):
    rng = np.random.RandomState(seed)
    base = rng.rand(h, w, 3)
    return np.stack([(np.roll(base, 7 * i, axis=1) * 255).astype(np.uint8) for i in range(frames)])


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """Build the released-format model and run every case on the reference stack (one subprocess)."""
    from helpers.comfy import qwen25_tokenizer_dir

    work = tmp_path_factory.mktemp("oracle")
    vocab = qwen25_tokenizer_dir()
    model = str(work / "Qwen2.5-VL-tiny-4.49")
    oracle("build", model, vocab, TEMPLATE)
    images = []
    for i, (w, h) in enumerate([(150, 100), (187, 111)]):
        path = str(work / f"image{i}.png")
        _image(i, w, h).save(path)
        images.append(path)
    clips = {"clip7s": (_clip(3, 21, 160, 120), 3.0), "small": (_clip(4, 8, 64, 48), 2.0)}
    videos = {}
    for name, (frames, fps) in clips.items():
        path = str(work / f"{name}.npy")
        np.save(path, frames)
        with open(path + ".json", "w") as fh:
            json.dump({"fps": fps}, fh)
        videos[name] = path
    cases = []
    for i, text in enumerate(TEXTS):
        cases.append({"id": f"training-{i}", "recipe": "training", "text": text})
    for recipe in ("comfyui", "scripts"):
        cases += [
            {"id": f"{recipe}-text", "recipe": recipe, "text": TEXTS[0]},
            {"id": f"{recipe}-1image", "recipe": recipe, "text": "Draw this in watercolour.", "images": images[:1]},
            {"id": f"{recipe}-2images", "recipe": recipe, "text": "Combine these.", "images": images},
            {"id": f"{recipe}-video", "recipe": recipe, "text": "What happens here?", "video": videos["clip7s"]},
        ]
    cases.append({"id": "comfyui-image-only", "recipe": "comfyui", "images": images[:1]})
    cases.append({"id": "multiturn", "recipe": "multiturn",
                  "turns": [{"text": "A cat on a sofa.", "image": images[0]},
                            {"text": "Now make it night.", "image": images[1]}]})
    cases.append({"id": "comfyui-small-video", "recipe": "comfyui", "text": "A tiny clip.", "video": videos["small"]})
    out = str(work / "oracle.safetensors")
    job = str(work / "job.json")
    with open(job, "w") as fh:
        json.dump({"model": model, "cases": cases, "out": out, "mask": "cuda"}, fh)
    oracle("run", job)
    with safe_open(out, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    return {"model": model, "cases": {c["id"]: c for c in cases}, "t": tensors, "meta": meta, "clips": clips}


@pytest.fixture(scope="module")
def ours(oracle_run):
    from x2i_core.mllm import load_mllm

    return load_mllm(oracle_run["model"], dtype="fp32")


def _request(case, clips):
    images = [Image.open(p) for p in case.get("images") or []] or None
    videos = None
    if case.get("video"):
        frames, fps = clips[os.path.basename(case["video"])[:-4]]
        videos = [list(sample_frames(frames, fps))]
    return EncodeRequest(text=case.get("text"), images=images, videos=videos)


def test_the_oracle_ran_the_reference_versions(oracle_run):
    versions = json.loads(oracle_run["meta"]["versions"])
    assert versions["transformers"] == "4.49.0" and versions["tokenizers"] == "0.21.0"
    assert oracle_run["meta"]["mask"] == "cuda"
    with open(os.path.join(oracle_run["model"], "config.json")) as fh:
        cfg = json.load(fh)
    assert "text_config" not in cfg and cfg["hidden_size"] == 64  # the released (flat) layout


def test_our_chat_template_is_the_official_one():
    from x2i_core.prompt import QWEN25VL_CHAT_TEMPLATE

    with open(TEMPLATE, encoding="utf-8") as fh:
        assert QWEN25VL_CHAT_TEMPLATE == fh.read()


CASE_IDS = ([f"training-{i}" for i in range(len(TEXTS))]
            + [f"{r}-{k}" for r in ("comfyui", "scripts") for k in ("text", "1image", "2images", "video")]
            + ["comfyui-image-only", "comfyui-small-video"])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_encoder_equals_the_reference_stack(oracle_run, ours, case_id):
    case = oracle_run["cases"][case_id]
    t = oracle_run["t"]
    ref = t[f"{case_id}.hidden"]
    hs = ours.encode(_request(case, oracle_run["clips"]), preset=case["recipe"])
    assert torch.equal(hs.attention_mask, t[f"{case_id}.attention_mask"]), case_id
    assert hs.hidden.shape == ref.shape, (hs.hidden.shape, ref.shape)
    diff = (hs.hidden - ref).abs().max().item()
    print(f"{case_id}: {tuple(ref.shape)}, max abs diff {diff:.2e}")
    assert diff <= TOL, f"{case_id}: max abs diff {diff}"


def test_left_pad_rows_depend_on_the_prompt_as_in_training(oracle_run, ours):
    """The old behaviour (a prompt-independent constant, transformers >= 4.5x) fails here."""
    t = oracle_run["t"]
    hs = ours.encode_text(TEXTS[:2], preset="training")
    for i in range(2):
        assert hs.attention_mask[i, 0] == 0
        assert (hs.hidden[i, :, 0] - t[f"training-{i}.hidden"][0, :, 0]).abs().max() <= TOL
    gap = (hs.hidden[0, :, 0] - hs.hidden[1, :, 0]).abs().max().item()
    print(f"pad rows of two prompts differ by up to {gap:.3f}")
    assert gap > 1e-2
    # The constant rows stay available as an explicit option (they differ from what training saw).
    const = ours.encode_text(TEXTS[:2], preset="training", pad_rows="constant")
    assert (const.hidden[0, :, 0] - const.hidden[1, :, 0]).abs().max() <= 1e-6
    assert (const.hidden[0, :, 0] - hs.hidden[0, :, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("case_id", ["comfyui-video", "scripts-video", "comfyui-small-video"])
def test_video_positions_and_pixels_equal_the_reference(oracle_run, ours, case_id):
    case = oracle_run["cases"][case_id]
    t = oracle_run["t"]
    batch, _, _ = ours.prepare([_request(case, oracle_run["clips"])], case["recipe"])
    assert torch.equal(batch["video_grid_thw"], t[f"{case_id}.video_grid_thw"])
    assert torch.allclose(batch["second_per_grid_ts"].float(), t[f"{case_id}.second_per_grid_ts"].float())
    assert (batch["pixel_values_videos"] - t[f"{case_id}.pixel_values_videos"]).abs().max() <= 1e-5
    # The positions the pack feeds the decoder (computed by the pack, not by the installed transformers).
    positions = ours.forward_inputs(batch)["position_ids"]
    assert torch.equal(positions, t[f"{case_id}.positions"])


def test_exact_fill_keeps_its_savings_with_training_pad_rows(oracle_run, ours):
    """Left padding runs the real tokens after the preset's fixed opening (computed once, before counting) plus
    one pad query per prompt, never the 512-token sequence."""
    opening = len(ours.prompt_prefix("training")[0])
    seen = []
    hook = ours.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[:2].numel()),
        with_kwargs=True)
    try:
        fast = ours.encode_text(TEXTS, preset="training")
        tokens_fast = sum(seen)
        seen.clear()
        slow = ours.encode_text(TEXTS, preset="training", exact_fill=False)
        tokens_slow = sum(seen)
    finally:
        hook.remove()
    assert (fast.hidden - slow.hidden).abs().max().item() <= TOL
    for i in range(len(TEXTS)):
        assert (fast.hidden[i:i + 1] - oracle_run["t"][f"training-{i}.hidden"]).abs().max() <= TOL
    longest = max(fast.lengths)
    assert tokens_slow == len(TEXTS) * 512
    assert opening >= 10 and tokens_fast == len(TEXTS) * (longest - opening + 1)


def test_reference_multi_turn_recipe(oracle_run, ours):
    """Each turn the MLLM answers; the AlignNet gets the last turn's prompt states ++ its answer's states."""
    from x2i_core.mllm import ChatTurn

    case = oracle_run["cases"]["multiturn"]
    answers = json.loads(json.loads(oracle_run["meta"]["cases"])["multiturn"])
    first, last = case["turns"]
    history = [ChatTurn("user", first["text"], images=[Image.open(first["image"])]), ChatTurn("assistant", answers[0])]
    answer, hs = ours.reference_multi_turn(EncodeRequest(text=last["text"], images=[Image.open(last["image"])],
                                                         history=history))
    assert answer == answers[1]
    ref = oracle_run["t"]["multiturn.hidden"]
    assert hs.hidden.shape == ref.shape, (hs.hidden.shape, ref.shape)
    diff = (hs.hidden - ref).abs().max().item()
    print(f"multi-turn: answers {answers!r}, states {tuple(ref.shape)}, max abs diff {diff:.2e}")
    assert diff <= TOL
