"""The node pack in the real ComfyUI (v0.3.75 source from the registry wheel): server, executor, workflows."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.comfy import _expect_node_error, node_of, tiny_api
from tools.comfy_fetch import PACK_LINK_NAME, ROOT
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfy

NODE_IDS = ["X2IMLLMLoader", "X2IMLLMEncode", "X2IAlignNetLoader", "X2IAlignNetProject", "X2ISampler",
            "X2ILightControlLoader", "X2IChatTurn", "X2IMLLMReason", "X2IBlendConditioning"]
WORKFLOWS = sorted(f for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".json"))






def test_quick_test_for_ci_imports_the_pack_without_failures(host, tmp_path):
    r = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", host["base"],
                        "--database-url", "sqlite:///:memory:"],
                       cwd=host["comfy_dir"], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "IMPORT FAILED" not in out
    assert PACK_LINK_NAME in out  # listed among the custom node imports


def test_all_node_ids_registered_with_tooltips_on_every_input(host):
    info = host["server"].object_info()
    for nid in NODE_IDS:
        assert nid in info, nid
        assert info[nid]["category"].startswith("X2I")
        for group in ("required", "optional"):
            for name, spec in info[nid]["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{nid}.{name} has no tooltip"
    assert {"Qwen2.5-VL-tiny", "not-a-qwen", "minicpmo-remote"} <= set(
        info["X2IMLLMLoader"]["input"]["required"]["model_name"][1]["options"])
    assert info["X2IMLLMEncode"]["output"] == ["X2I_HIDDEN"]
    assert info["X2IAlignNetProject"]["output"] == ["CONDITIONING"]


# Workflows also checked for exact repeats after /free and for prompt sensitivity (the others run once here;
# tests/test_tasks.py checks every task's hidden states per MLLM family).
REPEAT_CHECKED = {"x2i_text2image.json", "x2i_sampler.json", "x2i_lora.json", "x2i_edit_lightcontrol.json",
                  "x2i_multi_turn.json"}


@pytest.mark.workflows
@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_shipped_workflow_runs_end_to_end_and_repeats_exactly(host, workflow):
    if workflow == "x2i_text2image_native_qwen.json":  # stock Load CLIP only detects a real 7B Qwen2.5-VL file
        pytest.skip("runs in the real executor on a tiny ComfyUI Qwen2.5-VL in tests/test_native_clip.py")
    s = host["server"]
    api = tiny_api(host, workflow)
    if any(v["class_type"] == "X2IMLLMLoader" and v["inputs"]["model_name"] is None for v in api.values()):
        pytest.fail(f"{workflow}: the tiny model of its MLLM family is missing from the test host")
    entry = s.run(api)
    assert execution_error(entry) is None, execution_error(entry)
    (first,) = s.output_images(entry)
    a = np.asarray(Image.open(first))
    assert a.shape == (48, 64, 3)
    if workflow not in REPEAT_CHECKED:
        return
    # Drop caches and models (what the UI's "free" button does), run again: same seed, same image.
    # /free only sets a flag the worker reads when it wakes; a second /free wakes it if the first came
    # while it was between prompts (otherwise the next prompt would run before the flag is read).
    for _ in range(2):
        assert s.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
        time.sleep(0.75)
    entry2 = s.run(api)
    assert execution_error(entry2) is None
    (second,) = s.output_images(entry2)
    assert second != first
    assert np.array_equal(a, np.asarray(Image.open(second)))
    # A different prompt gives a different image.
    enc = node_of(api, "X2IMLLMEncode")
    api[enc]["inputs"]["text"] = "a completely different prompt about the deep blue ocean"
    entry3 = s.run(api)
    (third,) = s.output_images(entry3)
    assert not np.array_equal(a, np.asarray(Image.open(third)))


def test_image_batch_enters_as_comfy_image_tensors(host):
    s = host["server"]
    api = tiny_api(host, "x2i_sampler.json")
    enc = node_of(api, "X2IMLLMEncode")
    api["100"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    api["101"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["100", 0], "amount": 2}}
    api[enc]["inputs"]["image"] = ["101", 0]
    api[enc]["inputs"]["text"] = "Combine these pictures into one scene."
    entry = s.run(api)
    assert execution_error(entry) is None, execution_error(entry)
    assert len(s.output_images(entry)) == 1



def test_bad_inputs_give_clear_node_errors_and_the_host_keeps_working(host):
    s = host["server"]
    # unknown model names (API prompts can send any string): a node error naming the value and the folders
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", X2IMLLMLoader={"model_name": "no-such-model"}),
                       "X2IMLLMLoader", "no-such-model", "mllm folders")
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", X2IMLLMLoader={"model_name": "../../etc"}),
                       "X2IMLLMLoader", "not a plain name")
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", X2IAlignNetLoader={"alignnet_name": "/etc/passwd"}),
                       "X2IAlignNetLoader", "not a plain name")
    # a folder that is not a Qwen2.5-VL model
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", X2IMLLMLoader={"model_name": "not-a-qwen"}),
                       "X2IMLLMLoader", "llama", "Qwen2.5-VL")
    # mismatched AlignNet: names both files and the dimensions
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json",
                                      X2IAlignNetLoader={"alignnet_name": "alignnet-7b-like.safetensors"}),
                       "X2IAlignNetProject", "alignnet-7b-like.safetensors", "Qwen2.5-VL-tiny", "C=29", "C=3")
    # empty text and no image
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", X2IMLLMEncode={"text": "   "}),
                       "X2IMLLMEncode", "prompt is empty")
    # the next prompt works
    entry = s.run(tiny_api(host, "x2i_sampler.json"))
    assert execution_error(entry) is None


def test_nan_numbers_and_images_are_refused_at_the_node(host):
    """ComfyUI's range check is false for NaN, so a NaN widget reaches the node; each once sampled a
    "successful" black image."""
    nan = float("nan")
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", X2ISampler={"guidance": nan}),
                       "X2ISampler", "guidance must be a finite number")
    _expect_node_error(host, tiny_api(host, "x2i_text2image.json", X2IAlignNetProject={"guidance": nan}),
                       "X2IAlignNetProject", "guidance must be a finite number")
    # a NaN image as LightControl's hint, made by stock nodes (SolidMask's value passes validation too)
    api = tiny_api(host, "x2i_edit_lightcontrol.json")
    api["91"] = {"class_type": "SolidMask", "inputs": {"value": nan, "width": 64, "height": 48}}
    api["90"] = {"class_type": "MaskToImage", "inputs": {"mask": ["91", 0]}}
    api[node_of(api, "ControlNetApplyAdvanced")]["inputs"]["image"] = ["90", 0]
    _expect_node_error(host, api, "KSampler", "X2I LightControl", "contains NaN")
    entry = host["server"].run(tiny_api(host, "x2i_sampler.json"))  # and the host goes on
    assert execution_error(entry) is None


def test_conditioning_equals_standalone_and_mllm_is_managed(host, tmp_path):
    from x2i_core.alignnet import load_alignnet
    from x2i_core.mllm import EncodeRequest, load_mllm

    text = "一只在雪地里奔跑的红狐狸"
    api = {
        "1": {"class_type": "X2IMLLMLoader", "inputs": {"model_name": host["names"]["mllm"], "dtype": "fp32",
                                                        "device": "default"}},
        "2": {"class_type": "X2IMLLMEncode", "inputs": {"mllm": ["1", 0], "text": text, "preset": "auto",
                                                        "image_resolution": 0}},
        "3": {"class_type": "X2IAlignNetLoader", "inputs": {"alignnet_name": host["names"]["alignnet_published"]}},
        "4": {"class_type": "X2IAlignNetProject", "inputs": {"hidden": ["2", 0], "alignnet": ["3", 0], "guidance": 2.5}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "7": {"class_type": "UNETLoader", "inputs": {"unet_name": host["names"]["unet"], "weight_dtype": "default"}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0],
                                                   "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "x2i_inproc"}},
    }
    out = str(tmp_path / "cond.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompt": api,
                                "capture": ["4"], "out": out}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    facts = json.loads(open(out + ".json").read())
    assert facts["success"], facts
    assert facts["4.0.guidance"] == 2.5
    assert facts["managed_before"], "the MLLM/AlignNet were not loaded through ComfyUI model management"
    assert facts["managed_after"] == []
    from safetensors.torch import load_file

    got = load_file(out)
    enc = load_mllm(host["tiny"]["mllm"], dtype="fp32")
    net = load_alignnet(host["tiny"]["alignnet"])
    with torch.no_grad():
        pooled, seq = net(enc.encode(EncodeRequest(text=text)).hidden)
    assert got["4.0.seq"].shape == seq.shape == (1, 512, 4096)
    assert (got["4.0.seq"] - seq).abs().max().item() <= 1e-6
    assert (got["4.0.pooled"] - pooled).abs().max().item() <= 1e-6


def test_distilled_alignnet_loads_and_runs_in_the_nodes(host, tmp_path):
    """A short distillation on the tiny FLUX (4096-wide context), then the trained file in the X2I workflow."""
    caps = tmp_path / "caps.txt"
    caps.write_text("a red fox in the snow\na cat on a table\n")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "x2i_core", "distill", f"mllm={host['tiny']['mllm']}",
                        f"flux={host['tiny']['flux']}", f"output_dir={out}", f"data.paths=[{caps}]",
                        "distill.resolution=32", "train.steps=2", "checkpoint.every=0"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    import shutil

    shutil.copy(out / "alignnet.safetensors", os.path.join(host["base"], "models", "x2i", "distilled.safetensors"))
    entry = host["server"].run(tiny_api(host, "x2i_sampler.json", X2IAlignNetLoader={"alignnet_name": "distilled.safetensors"}))
    assert execution_error(entry) is None, execution_error(entry)
    assert len(host["server"].output_images(entry)) == 1


def test_readme_api_example_queues_a_shipped_api_workflow(host, tmp_path):
    """The README's Python example, run as written against the real server (only the address and the file,
    here the tiny-model version of the same API workflow, are swapped in), as a script of its own."""
    import re

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    api = tiny_api(host, "x2i_sampler.json")
    path = tmp_path / "x2i_sampler.json"
    path.write_text(json.dumps(api))
    assert code.count("workflows/api/x2i_sampler.json") == 1 and code.count("http://127.0.0.1:8188") == 1
    code = code.replace("workflows/api/x2i_sampler.json", str(path)).replace("http://127.0.0.1:8188",
                                                                              host["server"].url)
    script = tmp_path / "readme_api_example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    entry = host["server"].wait(r.stdout.strip())
    assert execution_error(entry) is None, execution_error(entry)
    (image,) = host["server"].output_images(entry)
    assert np.asarray(Image.open(image)).shape == (48, 64, 3)
    enc = node_of(api, "X2IMLLMEncode")
    assert entry["prompt"][2][enc]["inputs"]["text"] == "a lighthouse on a cliff in a storm, oil painting"
