"""Hardening, round two (issue: budgets, declared sizes, prompts never lost, caches an interrupt cannot poison)."""

import os

import pytest
import torch

from x2i_core.mllm import EncodeRequest


class _Interrupted(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (raised from a progress hook on Cancel)."""


def test_a_cancel_inside_the_opening_forward_leaves_no_poisoned_cache(tiny):
    """The opening cache is written only once complete: a Cancel during its forward, then the same encode,
    gives the bytes a fresh model gives, and the cache holds the opening (not a stored "none")."""
    from x2i_core.mllm import load_mllm

    fresh = load_mllm(tiny["mllm"], dtype="fp32").encode_text("a lighthouse at dusk", preset="training").hidden
    enc = load_mllm(tiny["mllm"], dtype="fp32")
    calls = {"n": 0}

    def cancel_once(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise _Interrupted()

    hook = enc.decoder_layers[0].register_forward_pre_hook(cancel_once)
    try:
        with pytest.raises(_Interrupted):
            enc.encode_text("a lighthouse at dusk", preset="training")
    finally:
        hook.remove()
    assert all(v is not None for v in enc.__dict__.get("_prefixes", {}).values()), "a half-written cache entry"
    again = enc.encode_text("a lighthouse at dusk", preset="training").hidden
    assert enc.prompt_prefix("training") is not None
    assert torch.equal(again, fresh)


def _alignnet_file(path, **config_changes):
    """A tiny AlignNet whose stored config claims ``config_changes`` (its tensors unchanged)."""
    from helpers.files import with_config
    from x2i_core.tiny import build_alignnet

    build_alignnet(channels=3, hidden=64, seed=1, use_t5=True, output_dim0=32, output_dim1=48).save(path)
    return with_config(path, **config_changes)


@pytest.mark.parametrize("changes,needle", [
    ({"output_dim1": 10**6}, "has shape"),   # once: "tried to allocate 4 TB"
    ({"output_dim1": 20_000}, "has shape"),  # once: +1.5 GB before the error
    ({"num_heads": 0}, "'num_heads' must be positive"),   # once: ZeroDivisionError
    ({"num_heads": -2}, "'num_heads' must be positive"),  # once: "negative dimension"
    ({"norm_eps": float("nan")}, "'norm_eps' must be a small positive number"),
])
def test_an_alignnet_config_that_contradicts_its_tensors_is_refused_before_allocation(tmp_path, changes, needle):
    import subprocess
    import sys

    path = _alignnet_file(str(tmp_path / "a.safetensors"), **changes)
    good = _alignnet_file(str(tmp_path / "good.safetensors"))
    code = ("from x2i_core.alignnet import load_alignnet\n"
            f"load_alignnet({good!r})\n"  # the library's lazy imports happen here, not in the measured load
            "from x2i_core.errors import X2IFileError\n"
            "def status(key):\n"
            "    return int(next(ln for ln in open('/proc/self/status') if ln.startswith(key)).split()[1])\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"  # the peak starts again from what is resident
            "before = status('VmRSS')\n"
            "try:\n"
            f"    load_alignnet({path!r})\n"
            "    print('LOADED')\n"
            "except X2IFileError as exc:\n"
            "    print('ERROR', exc)\n"
            "print('RISE_KB', status('VmHWM') - before)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "ERROR" in out and needle in out and "Traceback" not in r.stderr, out + r.stderr[-2000:]
    rise_mb = int(out.split("RISE_KB")[1].split()[0]) / 1024
    print(f"\n{changes}: peak RSS rise before the refusal {rise_mb:.1f} MB")
    assert rise_mb <= 100, f"{rise_mb:.0f} MB allocated before the refusal"


LONG = " ".join(["A detailed description of a medieval castle on a green hill under a stormy sky."] * 20)


def test_a_long_text_chat_keeps_its_last_turn_and_drops_the_oldest(encoder, caplog):
    """Once: 'training' kept the first 512 tokens, so after two long turns two different final prompts gave
    byte-identical conditioning."""
    from x2i_core.mllm import ChatTurn

    history = [ChatTurn("user", LONG), ChatTurn("assistant", LONG), ChatTurn("user", LONG), ChatTurn("assistant", "ok")]
    a = encoder.encode(EncodeRequest(text="a red fox in the snow", history=history), preset="auto")
    b = encoder.encode(EncodeRequest(text="a blue whale in the deep sea", history=history), preset="auto")
    assert a.preset == "training" and a.hidden.shape[2] == 512
    assert not torch.equal(a.hidden, b.hidden)
    assert "dropped its" in caplog.text
    # what is kept is the newest turns, whole: the prompt equals the chat without its first exchange
    c = encoder.encode(EncodeRequest(text="a red fox in the snow", history=history[2:]), preset="auto")
    assert torch.equal(a.hidden, c.hidden)


def test_a_chat_whose_last_turn_alone_is_too_long_is_refused_with_the_numbers(encoder):
    from x2i_core.errors import X2IInputError
    from x2i_core.mllm import ChatTurn

    with pytest.raises(X2IInputError, match=r"last turn alone is more than the 'training' preset's fixed 512"):
        encoder.encode(EncodeRequest(text=LONG + " " + LONG, history=[ChatTurn("user", "hi"), ChatTurn("assistant", "hello")]),
                       preset="training")


def test_a_single_long_prompt_is_still_cut_as_the_reference_training_did(encoder):
    hs = encoder.encode(EncodeRequest(text=LONG + " " + LONG), preset="training")
    assert hs.hidden.shape[2] == 512 and hs.lengths[0] > 512


def test_a_text_over_the_token_budget_is_refused_before_the_forward(encoder, monkeypatch):
    """A long text or chat under a growing preset is held to the same budget as media (every layer's hidden
    states of every token are kept): refused with the numbers after tokenising, before the decoder runs."""
    from x2i_core.errors import X2IInputError

    monkeypatch.setenv("X2I_TOKEN_BUDGET", "300")
    calls = []
    monkeypatch.setattr(encoder.model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(X2IInputError, match=r"prompt 1 is \d+ tokens .* more than 300, X2I's token budget"):
        encoder.encode(EncodeRequest(text=LONG), preset="comfyui")
    assert calls == []
    monkeypatch.undo()  # the control: the same text under the default budget encodes
    assert encoder.encode(EncodeRequest(text=LONG), preset="comfyui").lengths[0] > 300


def test_reasoning_over_a_question_longer_than_512_tokens_keeps_its_generation_prompt(encoder):
    """Once: the question was cut at 512 (losing the generation prompt) and the answer sliced at the uncut
    length: "produced no answer tokens" although the model answered."""
    text, hs = encoder.generate_answer(EncodeRequest(text=LONG + " What is in the picture?"), max_new_tokens=6)
    assert hs.lengths[0] >= 1 and hs.hidden.shape[2] == hs.lengths[0]
    batch, _, lengths = encoder.prepare([EncodeRequest(text=LONG + " What is in the picture?")], "scripts", pad=False)
    assert lengths[0] > 512 and batch["input_ids"].shape[1] == lengths[0]
    assert encoder.processor.tokenizer.decode(batch["input_ids"][0, -3:]).strip().startswith("assistant") or \
        "assistant" in encoder.processor.tokenizer.decode(batch["input_ids"][0, -5:])


# -- budgets before work -------------------------------------------------------------------------------------------

_BUDGET_SCRIPT = """
import sys, json
import torch
from x2i_core.mllm import EncodeRequest, load_mllm
from x2i_core.errors import X2IInputError
import x2i_core.mllm.prompting as prompting
enc = load_mllm(sys.argv[1], dtype="fp32")
calls = {"to_pil": 0, "processor": 0}
real_to_pil, real_proc = prompting.to_pil, type(enc).processor_inputs
def spy_to_pil(*a, **k):
    calls["to_pil"] += 1
    return real_to_pil(*a, **k)
def spy_proc(self, built):
    calls["processor"] += 1
    return real_proc(self, built)
prompting.to_pil = spy_to_pil
type(enc).processor_inputs = spy_proc
images = torch.rand(16, 1024, 1024, 3)
def status(key):  # kB, from the kernel
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is resident now
before = status("VmRSS")
try:
    enc.encode(EncodeRequest(text="a castle", images=images), preset="comfyui", image_size=3584)
    out = {"error": None}
except X2IInputError as exc:
    out = {"error": str(exc)}
out["rise_mb"] = (status("VmHWM") - before) / 1024
out.update(calls)
print("RESULT", json.dumps(out))
"""


def test_images_over_the_token_budget_are_refused_before_any_is_converted_or_processed(tiny):
    """Once: 16 images at image_resolution 3584 were converted and sent to the processor (hundreds of MB of
    patches) before the position check refused them.  Now their tokens come from their declared sizes."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, X2I_TOKEN_BUDGET="2000")
    r = subprocess.run([sys.executable, "-c", _BUDGET_SCRIPT, tiny["mllm"]], capture_output=True, text=True,
                       timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["error"] and "16 image(s): 19600 tokens (1225 each)" in out["error"], out
    assert "more than 2000" in out["error"] and "image_resolution" in out["error"], out
    assert out["to_pil"] == 0 and out["processor"] == 0, out
    print(f"\n16 images of 1024^2 at 3584: peak RSS rise before the refusal {out['rise_mb']:.1f} MB")
    assert out["rise_mb"] <= 100, f"{out['rise_mb']:.0f} MB allocated before the refusal"


def test_the_budget_counts_what_the_processor_makes(encoder):
    """The declared-size count equals the processor's own image tokens (the budget neither refuses what fits nor
    lets through what does not), for wide, tall and square images at several resolutions."""
    from x2i_core.prompt import SPECS, with_image_size

    image_id = next(iter(encoder.media_token_ids() & {int(encoder.model.config.image_token_id)}))
    for w, h, res in ((640, 480, 0), (300, 900, 448), (1024, 1024, 3584), (50, 40, 0)):
        img = torch.rand(1, h, w, 3)
        batch, _, _ = encoder.prepare([EncodeRequest(text="x", images=img)], "comfyui", image_size=res or None)
        made = int((batch["input_ids"] == image_id).sum())
        spec = with_image_size(SPECS["comfyui"], res or None)
        assert encoder.image_tokens(w, h, spec) == made, (w, h, res)


def _video_file(path, frames=40, size=(320, 240), rate=10):
    import numpy as np

    from tools.comfy_fetch import write_video

    rng = np.random.default_rng(0)

    def frame(i):
        img = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        img[:, : 8 * (i % 20)] = 0
        return img

    return write_video(path, (frame(i) for i in range(frames)), rate=rate)


def test_video_frames_resized_as_they_decode_equal_the_full_size_path(tmp_path):
    """Frames are resized at decode time to the size the encoder gives them, so a long high-resolution clip
    never sits in memory at full size; the frames the processor sees are the same bytes."""
    import numpy as np

    from x2i_core.media import decode_sampled_frames, video_frames

    path = _video_file(tmp_path / "clip.mp4")
    for budget in (128 * 128, 224 * 224):
        full = video_frames(decode_sampled_frames(path, 40, 10.0, fps=2.0), budget)
        small_raw = decode_sampled_frames(path, 40, 10.0, fps=2.0, max_pixels=budget)
        assert small_raw.shape[1] * small_raw.shape[2] < 320 * 240
        assert small_raw[0].shape == np.asarray(full[0]).shape
        small = video_frames(small_raw, budget)
        assert len(full) == len(small)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(full, small))


def test_a_clip_over_the_token_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    import x2i_core.media as media
    from x2i_core.errors import X2IInputError

    path = _video_file(tmp_path / "clip.mp4")
    decoded = []
    monkeypatch.setattr(media, "_decode_at", lambda *a, **k: decoded.append(1))
    with pytest.raises(X2IInputError, match=r"40 sampled frames of 320x240 need 300 visual tokens.*lower max_frames"):
        media.decode_sampled_frames(path, 40, 10.0, fps=10.0, max_frames=768, max_pixels=128 * 128, token_budget=100)
    assert not decoded


# -- raw errors that now name their cause ------------------------------------------------------------------------

def _copy_mllm(tiny, tmp_path):
    import shutil

    dst = tmp_path / "mllm"
    shutil.copytree(tiny["mllm"], dst)
    return dst


@pytest.mark.parametrize("case,needle", [
    ("deep-config", "nested too deeply"),                   # once: RecursionError
    ("patch-size-zero", "patch_size is 0"),                 # once: ZeroDivisionError in the processor
    ("rms-eps-nan", "rms_norm_eps is nan"),                 # once: NaN hidden states blamed on damaged weights
    ("tokenizer-json-only", "no tokenizer_config.json"),     # once: the protobuf message on transformers 4.x
])
def test_malformed_mllm_folders_get_errors_that_name_the_file_and_key(tiny, tmp_path, case, needle):
    import json

    from x2i_core.errors import X2IFileError
    from x2i_core.mllm import load_mllm

    folder = _copy_mllm(tiny, tmp_path)
    cfg_path = folder / "config.json"
    if case == "deep-config":
        cfg_path.write_text('{"model_type": "qwen2_5_vl", "a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "patch-size-zero":
        name = "preprocessor_config.json" if (folder / "preprocessor_config.json").exists() else "processor_config.json"
        pre = json.loads((folder / name).read_text())
        target = pre.get("image_processor", pre)
        target["patch_size"] = 0
        (folder / name).write_text(json.dumps(pre))
    elif case == "rms-eps-nan":
        cfg = json.loads(cfg_path.read_text())
        (cfg.get("text_config") or cfg)["rms_norm_eps"] = float("nan")
        cfg_path.write_text(json.dumps(cfg))
    else:
        for name in os.listdir(folder):
            if name.startswith(("tokenizer_config", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
                os.remove(folder / name)
    with pytest.raises(X2IFileError, match=needle) as info:
        load_mllm(str(folder), dtype="fp32")
    assert "Traceback" not in str(info.value)


# -- the CLI: media read first, bounded sizes, devices named ----------------------------------------------------------

def test_the_cli_reads_media_before_loading_any_model_and_names_bad_options(tiny, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import x2i_core.pipeline as pipeline
    from x2i_core import cli

    loads = []
    monkeypatch.setattr(pipeline.X2IPipeline, "from_paths", classmethod(lambda *a, **k: loads.append(1)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    base = ["generate", "--mllm", tiny["mllm"], "--alignnet", tiny["alignnet_safetensors"], "--flux", tiny["flux"],
            "--out", str(tmp_path / "o.png")]
    assert cli.main(base + ["--image", str(bad)]) == 1
    assert "not a readable image" in capsys.readouterr().err and not loads
    # a decompression bomb (a header declaring more pixels than PIL opens) is an error, not a traceback
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert cli.main(base + ["--image", str(bomb)]) == 1
    assert "more pixels than PIL opens safely" in capsys.readouterr().err and not loads
    for option, value, needle in (("--device", "cuda:banana", "device 'cuda:banana'"),
                                  ("--device", "potato", "device 'potato'"),
                                  ("--size", "32768x1024", "more than 16384")):
        with pytest.raises(SystemExit) as info:
            cli.main(base + ["--prompt", "x", option, value])
        assert info.value.code == 2
        assert needle in capsys.readouterr().err


# -- LightControl configs: checked before anything is built ----------------------------------------------------------

@pytest.mark.parametrize("changes,needle", [
    ({"num_modules": 0}, "num_modules is 0"),
    ({"out_dim": 10**7}, "has shape"),         # checked against the tensors on the meta device, never allocated
    ({"groups": [4, 7]}, "not divisible"),
    ({"in_channels": [64, 128]}, "in_channels[0] is 64"),
    ({"scale": float("nan")}, "scale is nan"),
])
def test_a_lightcontrol_config_that_cannot_be_built_is_refused_by_name(tiny, tmp_path, changes, needle):
    from helpers.files import with_config
    from x2i_core.errors import X2IFileError
    from x2i_core.lightcontrol import LightControl, LightControlConfig, load_lightcontrol

    path = str(tmp_path / "lc.safetensors")
    LightControl(LightControlConfig(num_modules=2, out_dim=32)).save(path)
    with_config(path, **changes)
    with pytest.raises(X2IFileError) as info:
        load_lightcontrol(path)
    assert needle in str(info.value), str(info.value)


# -- Cancel at every stage of an encode, budgets and what a node drops, in the real executor -------------------------

@pytest.fixture(scope="module")
def executor_runs(host, tmp_path_factory):
    """One in-process ComfyUI executor (the harness of the battery) running: Cancel pressed as the processor
    starts, as the vision tower's first block starts and inside the decoder, each followed by a good prompt; an
    image prompt over the token budget; a text prompt the training preset cuts."""
    import json
    import subprocess
    import sys

    from helpers.comfy import node_of, tiny_api

    prompts, faults = {}, {}
    for i, stage in enumerate(("cancel-processor", "cancel-vision", "cancel")):
        api = tiny_api(host, "x2i_image2image.json")
        api[node_of(api, "X2IMLLMEncode")]["inputs"]["text"] = f"cancel row {i}: a lighthouse"  # no cache hit
        prompts[stage], faults[stage] = api, stage
        good = tiny_api(host, "x2i_image2image.json")
        good[node_of(good, "X2ISampler")]["inputs"]["seed"] = 100 + i
        prompts[f"after:{stage}"] = good
    from PIL import Image

    Image.new("RGB", (1400, 1400), (90, 120, 200)).save(os.path.join(host["base"], "input", "big-photo.png"))
    prompts["over-budget"] = tiny_api(host, "x2i_image2image.json", X2IMLLMEncode={"image_resolution": 3584},
                                      LoadImage={"image": "big-photo.png"})
    prompts["cut"] = tiny_api(host, "x2i_sampler.json", X2IMLLMEncode={"text": LONG + " " + LONG, "preset": "training"})
    tmp = tmp_path_factory.mktemp("cancel")
    out = str(tmp / "out.safetensors")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompts": prompts,
                                "faults": faults, "capture": {}, "out": out}))
    env = dict(os.environ, X2I_TOKEN_BUDGET="1000")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(open(out + ".json").read())


@pytest.mark.comfy
@pytest.mark.parametrize("stage,vision_blocks", [("cancel-processor", 1), ("cancel-vision", 1), ("cancel", None)])
def test_cancel_stops_an_encode_at_the_stage_it_lands_in(executor_runs, stage, vision_blocks, record_property):
    """Once Cancel was checked only between decoder layers: a 4096^2 image ran the processor and the whole
    vision tower (36 s) first.  Now the prompt side checks per image and before the processor, and every block of
    the vision / audio towers checks before it runs."""
    log = executor_runs["fault_log"][stage]
    assert "execution_interrupted" in executor_runs["status"][stage], executor_runs["status"][stage]
    assert "pressed" in log and "raised" in log, log
    if vision_blocks is not None:  # stopped before the decoder, within the first vision block
        assert log["decoder_layers"] == 0 and log["vision_blocks"] == vision_blocks, log
    latency_ms = (log["raised"] - log["pressed"]) * 1000
    record_property("cancel_latency_ms", round(latency_ms, 3))
    print(f"\n{stage}: Cancel -> raised in {latency_ms:.2f} ms ({log})")
    assert "execution_success" in executor_runs["status"][f"after:{stage}"]


@pytest.mark.comfy
def test_an_image_prompt_over_the_token_budget_is_a_node_error_naming_the_widget(executor_runs):
    (msg,) = executor_runs["errors"]["over-budget"]
    assert "X2I MLLM Encode" in msg and "more than 1000" in msg and "image_resolution" in msg, msg
    assert "Traceback" not in msg


@pytest.mark.comfy
def test_what_an_encode_drops_is_shown_on_the_node(executor_runs):
    assert "execution_success" in executor_runs["status"]["cut"], executor_runs["status"]["cut"]
    texts = [t for _, t in executor_runs["progress_text"]["cut"]]
    assert any("truncated to 512" in t for t in texts), texts
