"""X2I CLIP Encode (nodes/clip_nodes.py): ComfyUI's own Qwen2.5-VL text encoders as the X2I MLLM.

ComfyUI's stock loader detects Qwen2.5-VL-7B / -3B only at their real widths (a 512 / 256 wide k_proj
bias, fixed 128-wide heads: 7-8 B and 3 B parameters), far too big for these CPU tests.  So the tests build
ComfyUI's own classes - ``comfy.text_encoders.llama.Qwen25_7BVLI`` / ``Qwen25_3B`` with
``qwen_vl.Qwen2VLVisionTransformer``, inside a stock ``comfy.sd.CLIP`` with the stock Qwen-Image /
OmniGen2 tokenizer wrappers - with the tiny Qwen2.5-VL's config, load the tiny model's weights into them
(the same file the transformers path reads) and compare with ``Qwen25VLEncoder``.

The workflow ``x2i_text2image_native_qwen.json`` runs through ComfyUI's real executor in-process with
its stock nodes; only the file read behind the stock Load CLIP node (``comfy.sd.load_clip``) is replaced
by the tiny CLIP, because no stock-loadable Qwen2.5-VL fits a CPU test.  The real frontend opens the
file in tests/test_frontend.py like every shipped workflow.

Everything that imports ComfyUI runs in one subprocess (this file run as a script): ComfyUI's top-level
modules (``nodes``, ``utils``, ...) must not shadow the pack's packages inside the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.comfy  # all but the workflow-file check read the in-process executor's report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOL = 1e-5
WORKFLOW = "x2i_text2image_native_qwen.json"
CLIP_FILE = "qwen_2.5_vl_7b_fp8_scaled.safetensors"  # the name the shipped workflow asks for

# id -> (ComfyUI family, preset, text, images as (seed, width, height), image_resolution)
CASES = {
    "7b-training": ("7b", "training", "A red fox jumps over a lazy dog in the snowy forest at dawn.", (), 0),
    "7b-training-chinese": ("7b", "training", "一只可爱的小猫坐在窗台上，阳光明媚。", (), 0),
    "7b-training-truncated": ("7b", "training", " ".join(["A photo of a cat sitting on a wooden table."] * 60),
                              (), 0),
    "7b-auto-text": ("7b", "auto", "An oil painting of a lighthouse on a rocky coast.", (), 0),
    "7b-comfyui-text": ("7b", "comfyui", "A futuristic city skyline at night with neon lights.", (), 0),
    "7b-scripts-text": ("7b", "scripts", "An oil painting of a lighthouse.", (), 0),
    "7b-comfyui-image": ("7b", "comfyui", "Draw this in watercolour.", ((0, 300, 200),), 0),
    "7b-comfyui-two-images": ("7b", "comfyui", "Combine these pictures into one scene.",
                              ((1, 150, 100), (2, 150, 100)), 0),
    "7b-comfyui-image-only": ("7b", "comfyui", None, ((3, 240, 180),), 0),
    "7b-auto-image-336": ("7b", "auto", "The same scene at night.", ((4, 200, 300),), 336),
    "7b-scripts-image": ("7b", "scripts", "Draw this.", ((5, 160, 120),), 0),
    "3b-training": ("3b", "training", "A red fox jumps over a lazy dog in the snowy forest at dawn.", (), 0),
    "3b-comfyui": ("3b", "comfyui", "Ein Hund läuft am Strand.", (), 0),
    "3b-scripts": ("3b", "scripts", "An oil painting of a lighthouse.", (), 0),
}


# ================================================================ the pytest side

@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Run the worker once; its JSON report is what the tests check."""
    from helpers.comfy import comfy_host_dir
    from tools.comfy_fetch import prepare_base
    from x2i_core.tiny import default_cache_dir, make_tiny_models

    tiny = make_tiny_models(default_cache_dir(), comfy=True)
    base = str(tmp_path_factory.mktemp("native-clip-base"))
    names = prepare_base(base, tiny)
    os.makedirs(os.path.join(base, "models", "text_encoders"), exist_ok=True)
    # A placeholder under the workflow's file name: the stock Load CLIP validates the name, the test's loader
    # stands in for reading it.
    open(os.path.join(base, "models", "text_encoders", CLIP_FILE), "wb").close()
    spec = {"comfy_dir": comfy_host_dir(), "base": base, "tiny": tiny, "names": names,
            "out": os.path.join(base, "report.json")}
    spec_path = os.path.join(base, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), spec_path], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    with open(spec["out"], encoding="utf-8") as fh:
        report = json.load(fh)
    print("max abs diff per case:", json.dumps(report["parity"], indent=1))
    return report


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_equal_the_transformers_path(native, case):
    r = native["parity"][case]
    assert r["shape"] == r["ref_shape"], r
    assert r["shape"][1] == 3  # 2 tiny layers + the embedding output
    assert r["mask_equal"] and r["lengths"] == r["ref_lengths"] and r["preset"] == r["ref_preset"], r
    assert r["max_abs_diff"] <= TOL, f"{case}: max abs diff {r['max_abs_diff']}"
    assert r["mllm"].startswith("Qwen2.5-VL-7B" if case.startswith("7b") else "Qwen2.5-VL-3B")


def test_padding_is_reproduced_not_just_the_real_tokens(native):
    # left padding (training) and right padding (comfyui/scripts) both compared over all 512+ positions
    p = native["parity"]
    assert p["7b-training"]["left_padded"] and p["7b-comfyui-text"]["right_padded"]
    assert p["7b-training-truncated"]["lengths"][0] > 512 and p["7b-training-truncated"]["shape"][2] == 512


def test_the_clip_runs_under_comfyui_model_management(native):
    assert native["managed"] is True


def test_other_clip_families_get_an_error_naming_the_supported_ones(native):
    for family, msg in native["errors"]["families"].items():
        assert msg.startswith("X2I CLIP Encode:"), (family, msg)
        for needed in ("Qwen2.5-VL-7B", "'qwen_image'", "C=29", "H=3584", "Qwen2.5-VL-3B", "'omnigen2'", "C=37",
                       "H=2048", "X2I MLLM Loader"):
            assert needed in msg, (family, needed, msg)
    assert "t5xxl" in native["errors"]["families"]["flux (clip_l + t5xxl)"]
    assert "clip_l" in native["errors"]["families"]["sd1 (clip_l)"]
    assert "qwen3_4b" in native["errors"]["families"]["z_image (qwen3_4b)"]


def test_bad_inputs_get_clear_errors(native):
    e = native["errors"]
    assert "no vision tower" in e["3b_with_image"] and "qwen_image" in e["3b_with_image"]
    assert "prompt is empty" in e["empty"]
    assert "'training' is text-only" in e["training_with_image"]


def test_alignnet_for_the_other_size_is_refused_naming_both_sides(native):
    e = native["errors"]
    # the real dims: the 3B text encoder's states into the 7B AlignNet
    msg = e["alignnet_real_dims"]
    # (C, H) alone is ambiguous: a file without an MLLM record is described by every candidate
    assert "Qwen2.5-VL-7B-Instruct or MiniCPM-o-2.6 or Qwen2.5-Omni-7B (C=29 layers+1, H=3584)" in msg, msg
    assert "Qwen2.5-VL-3B (ComfyUI text encoder)" in msg and "C=37, H=2048" in msg, msg
    # the tiny model through the node, into an AlignNet of other dims
    msg = e["alignnet_tiny"]
    assert "Qwen2.5-VL-7B (ComfyUI text encoder)" in msg and "C=3, H=64" in msg and "C=29" in msg, msg


def test_native_workflow_runs_in_the_real_executor_and_repeats(native):
    w = native["workflow"]
    assert w["loader_calls"] == [[CLIP_FILE, "QWEN_IMAGE"]] * 2, w
    assert w["success"] == [True, True], w
    assert w["image_shape"] == [48, 64, 3]
    assert w["repeat_equal"] is True
    # the conditioning of the shipped graph equals transformers path + the same AlignNet
    assert w["cond_seq_diff"] <= TOL and w["cond_pooled_diff"] <= TOL, w


def test_native_workflow_file_uses_stock_clip_loader_and_flux_nodes():
    with open(os.path.join(ROOT, "workflows", WORKFLOW), encoding="utf-8") as fh:
        wf = json.load(fh)
    types = {n["type"] for n in wf["nodes"]}
    assert {"CLIPLoader", "X2ICLIPEncode", "X2IAlignNetProject", "UNETLoader", "VAELoader", "KSampler",
            "SaveImage"} <= types
    assert "X2IMLLMLoader" not in types
    (loader,) = [n for n in wf["nodes"] if n["type"] == "CLIPLoader"]
    assert loader["widgets_values"][:2] == [CLIP_FILE, "qwen_image"]
    assert os.path.isfile(os.path.join(ROOT, "workflows", WORKFLOW.replace(".json", ".png")))


# ================================================================ the worker (run as a script)

def _tiny_clip(tiny_mllm: str, kind: str, model_options: dict | None = None):
    """A stock ``comfy.sd.CLIP`` holding ComfyUI's Qwen2.5-VL-7B (``kind="7b"``, with its vision tower) or
    Qwen2.5-VL-3B (``"3b"``) classes at the tiny model's widths, with the tiny model's weights and tokenizer."""
    import dataclasses

    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Tokenizer

    import comfy.sd
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.omnigen2 as omnigen2
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.qwen_vl as qwen_vl
    from comfy import sd1_clip

    with open(os.path.join(tiny_mllm, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    tc, vc = cfg.get("text_config", cfg), cfg["vision_config"]
    pad_id = tc.get("pad_token_id", cfg.get("pad_token_id"))
    heads = tc["num_attention_heads"]
    # 4.x writes rope_theta + rope_scaling, 5.x one rope_parameters dict; released folders carry the former
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or cfg.get("rope_scaling") or {}
    theta = tc.get("rope_theta", rope.get("rope_theta"))
    fields = dict(vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], intermediate_size=tc["intermediate_size"],
                  num_hidden_layers=tc["num_hidden_layers"], num_attention_heads=heads,
                  num_key_value_heads=tc["num_key_value_heads"], max_position_embeddings=tc["max_position_embeddings"],
                  rms_norm_eps=tc["rms_norm_eps"], rope_theta=theta)
    mrope = list(rope["mrope_section"])
    seven = kind == "7b"
    name = "qwen25_7b" if seven else "qwen25_3b"
    base_cls = llama.Qwen25_7BVLI if seven else llama.Qwen25_3B
    base_cfg = llama.Qwen25_7BVLI_Config if seven else llama.Qwen25_3BConfig

    @dataclasses.dataclass
    class TinyConfig(base_cfg):
        head_dim = tc["hidden_size"] // heads   # a class constant (128) in ComfyUI's configs
        rope_dims = mrope if seven else None

    class TinyQwen(base_cls):  # ComfyUI's class; only the widths differ
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            c = TinyConfig(**fields)
            self.num_layers = c.num_hidden_layers
            self.model = llama.Llama2_(c, device=device, dtype=dtype, ops=operations)
            if seven:
                self.visual = qwen_vl.Qwen2VLVisionTransformer(
                    hidden_size=vc["hidden_size"], output_hidden_size=c.hidden_size,
                    intermediate_size=vc["intermediate_size"], num_heads=vc["num_heads"], num_layers=vc["depth"],
                    patch_size=vc["patch_size"], temporal_patch_size=vc["temporal_patch_size"],
                    spatial_merge_size=vc["spatial_merge_size"], window_size=vc["window_size"],
                    device=device, dtype=dtype, ops=operations)
                self.visual.fullatt_block_indexes = list(vc["fullatt_block_indexes"])  # ComfyUI fixes the 7B's
            self.dtype = dtype

    class TinyClipModel(sd1_clip.SDClipModel):  # as qwen_image / omnigen2 configure theirs
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's own signature)
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config={}, dtype=dtype,
                             special_tokens={"pad": pad_id}, layer_norm_hidden_state=False, model_class=TinyQwen,
                             enable_attention_masks=True, return_attention_masks=True, model_options=model_options)

    class TinyTokenizer(sd1_clip.SDTokenizer):  # the stock wrapper's settings, the tiny vocabulary
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's own signature)
            super().__init__(tiny_mllm, pad_with_end=False, embedding_size=fields["hidden_size"], embedding_key=name,
                             tokenizer_class=Qwen2Tokenizer, has_start_token=False, has_end_token=False,
                             pad_to_max_length=False, max_length=99999999, min_length=1, pad_token=pad_id,
                             tokenizer_data=tokenizer_data)

    class Target:
        params = {}
        clip = qwen_image.QwenImageTEModel if seven else omnigen2.Omnigen2Model
        tokenizer = qwen_image.QwenImageTokenizer if seven else omnigen2.Omnigen2Tokenizer

    options = {f"{name}_class": TinyClipModel, "dtype": torch.float32, **(model_options or {})}
    clip = comfy.sd.CLIP(Target, tokenizer_data={f"{name}_tokenizer_class": TinyTokenizer}, model_options=options)
    sd = {}
    for k, v in load_file(os.path.join(tiny_mllm, "model.safetensors")).items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        if k.startswith("model.") or (seven and k.startswith("visual.")):
            sd[k] = v
    missing, unexpected = clip.load_sd(sd)
    assert not missing and not unexpected, (missing, unexpected)
    return clip


def _other_clips():
    """Tiny stock CLIPs of other families: SD1 (CLIP-L), FLUX (CLIP-L + T5-XXL), Z-Image (Qwen3-4B)."""
    import torch

    import comfy.sd
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.z_image as z_image
    from comfy import sd1_clip

    small_clip = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "projection_dim": 32}
    small_t5 = {"d_model": 32, "d_ff": 37, "num_layers": 1, "num_heads": 2, "d_kv": 8}
    small_qwen3 = {"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
                   "num_attention_heads": 2, "num_key_value_heads": 1}

    def make(clip_cls, tok_cls, **opts):
        class Target:
            params = {}
            clip = clip_cls
            tokenizer = tok_cls

        return comfy.sd.CLIP(Target, model_options={"dtype": torch.float32, **opts})

    return {
        "sd1 (clip_l)": make(sd1_clip.SD1ClipModel, sd1_clip.SD1Tokenizer, clip_l_model_config=small_clip),
        "flux (clip_l + t5xxl)": make(flux.flux_clip(), flux.FluxTokenizer, clip_l_model_config=small_clip,
                                      t5xxl_model_config=small_t5),
        "z_image (qwen3_4b)": make(z_image.te(), z_image.ZImageTokenizer, qwen3_4b_model_config=small_qwen3),
    }


def _image(seed, w, h):
    import numpy as np
    import torch

    rng = np.random.RandomState(seed)
    return torch.from_numpy(rng.rand(h, w, 3).astype(np.float32))[None]


def _worker(spec_path: str) -> None:
    import asyncio
    import importlib
    import types

    sys.path.insert(0, ROOT)
    from tools.comfy_inprocess import boot_in_process, cache_entry
    from tools.comfy_workflow import load_workflow, point_at_tiny, ui_to_api

    spec = boot_in_process(spec_path)  # ComfyUI in this process, the pack loaded as a custom node
    import numpy as np
    import torch
    from PIL import Image

    import comfy.model_management as mm
    import comfy.sd
    import execution
    import nodes as comfy_nodes

    (pack,) = {n.rsplit(".nodes.clip_nodes", 1)[0] for n in sys.modules if n.endswith(".nodes.clip_nodes")}
    clip_nodes = importlib.import_module(pack + ".nodes.clip_nodes")
    x2i_nodes = importlib.import_module(pack + ".nodes.x2i_nodes")
    managed = importlib.import_module(pack + ".nodes.models")
    mllm = importlib.import_module(pack + ".x2i_core.mllm")
    alignnet_mod = importlib.import_module(pack + ".x2i_core.alignnet")
    tiny = spec["tiny"]
    report: dict = {"parity": {}, "errors": {"families": {}}}

    encoder = mllm.load_mllm(tiny["mllm"], dtype="fp32")  # the transformers path
    clips = {"7b": _tiny_clip(tiny["mllm"], "7b"), "3b": _tiny_clip(tiny["mllm"], "3b")}

    # -- parity, every preset, text and text + image
    for case, (kind, preset, text, images, res) in CASES.items():
        ims = torch.cat([_image(*a) for a in images]) if images else None
        req = mllm.EncodeRequest(text=text, images=ims)
        (hs,) = clip_nodes.X2ICLIPEncode.execute(clips[kind], text or "", preset, res, ims).result
        ref = encoder.encode(req, preset=preset, image_size=res or None)
        m = hs.attention_mask
        report["parity"][case] = {
            "shape": list(hs.hidden.shape), "ref_shape": list(ref.hidden.shape),
            "max_abs_diff": float((hs.hidden - ref.hidden).abs().max()) if hs.hidden.shape == ref.hidden.shape
            else float("inf"),
            "mask_equal": bool(torch.equal(m, ref.attention_mask)), "lengths": hs.lengths, "ref_lengths": ref.lengths,
            "preset": hs.preset, "ref_preset": ref.preset, "mllm": hs.mllm,
            "left_padded": bool(m[0, 0] == 0 and m[0, -1] == 1), "right_padded": bool(m[0, 0] == 1 and m[0, -1] == 0),
        }
    report["managed"] = any(getattr(lm.model, "model", None) is clips["7b"].cond_stage_model
                            for lm in mm.current_loaded_models)

    # -- errors users see
    def message(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the message is what is checked
            return f"{exc}"
        return "(no error)"

    enc = clip_nodes.X2ICLIPEncode.execute
    for label, other in _other_clips().items():
        report["errors"]["families"][label] = message(lambda c=other: enc(c, "a cat", "auto", 0, None))
    report["errors"]["3b_with_image"] = message(lambda: enc(clips["3b"], "a cat", "comfyui", 0, _image(0, 64, 64)))
    report["errors"]["empty"] = message(lambda: enc(clips["7b"], "  ", "auto", 0, None))
    report["errors"]["training_with_image"] = message(
        lambda: enc(clips["7b"], "a cat", "training", 0, _image(0, 64, 64)))
    cfg = alignnet_mod.AlignNetConfig

    def stub_alignnet(c, h, name):
        net = types.SimpleNamespace(config=cfg(in_channels=c, input_dim=h), provenance=None,
                                    fits=alignnet_mod.describe_dims(c, h))  # a file without an MLLM record
        return types.SimpleNamespace(net=net, name=name)

    hs3b = mllm.HiddenStates(torch.zeros(1, 37, 4, 2048), torch.ones(1, 4, dtype=torch.long),
                             "Qwen2.5-VL-3B (ComfyUI text encoder)", "training", [4])
    report["errors"]["alignnet_real_dims"] = message(
        lambda: x2i_nodes.project(hs3b, stub_alignnet(29, 3584, "alignnet-qwen2.5-vl-7b.safetensors")))
    (hs_tiny,) = enc(clips["7b"], "a cat", "auto", 0, None).result
    report["errors"]["alignnet_tiny"] = message(
        lambda: x2i_nodes.project(hs_tiny, stub_alignnet(29, 64, "alignnet-7b-like.safetensors")))

    # -- the shipped workflow through the real executor (Load CLIP's file read replaced by the tiny CLIP)
    calls = []

    def tiny_load_clip(ckpt_paths, embedding_directory=None, clip_type=None, model_options={}):  # noqa: B006 (ComfyUI's own signature)
        calls.append([os.path.basename(ckpt_paths[0]), clip_type.name])
        return _tiny_clip(tiny["mllm"], "7b", model_options)

    comfy.sd.load_clip = tiny_load_clip
    object_info = {}
    for ntype, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items():
        object_info[ntype] = {"input": cls.INPUT_TYPES()}
    names = spec["names"]
    api = point_at_tiny(ui_to_api(load_workflow(WORKFLOW), object_info), names)

    class _Server:
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, *a, **k):
            pass

    def nid(ctype):
        return next(k for k, v in api.items() if v["class_type"] == ctype)

    w = {"loader_calls": calls, "success": []}
    arrays = []
    for run in range(2):
        valid = asyncio.run(execution.validate_prompt(f"native-{run}", api, None))
        assert valid[0], (valid[1], valid[3])
        executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        executor.execute(api, f"native-{run}", {}, valid[2])
        w["success"].append(bool(executor.success))
        if not executor.success:
            w["messages"] = [str(m)[:2000] for m in executor.status_messages]
            break
        (img,) = executor.history_result["outputs"][nid("SaveImage")]["images"]
        arrays.append(np.asarray(Image.open(os.path.join(spec["base"], "output", img.get("subfolder", ""),
                                                         img["filename"]))))
        if run == 0:
            cond = cache_entry(executor.caches.outputs, nid("X2IAlignNetProject")).outputs[0][0]
        mm.unload_all_models()  # what /free does: the second run starts from nothing
    if len(arrays) == 2:
        w["image_shape"] = list(arrays[0].shape)
        w["repeat_equal"] = bool(np.array_equal(arrays[0], arrays[1]))
        enc_inputs = api[nid("X2ICLIPEncode")]["inputs"]
        ref = encoder.encode(mllm.EncodeRequest(text=enc_inputs["text"]), preset=enc_inputs["preset"])
        net = managed.load_managed_alignnet(os.path.join(spec["base"], "models", "x2i", names["alignnet"]),
                                            names["alignnet"])
        ((seq_ref, extra_ref),) = x2i_nodes.project(ref, net, api[nid("X2IAlignNetProject")]["inputs"]["guidance"])
        ((seq, extra),) = cond
        w["cond_seq_diff"] = float((seq - seq_ref).abs().max())
        w["cond_pooled_diff"] = float((extra["pooled_output"] - extra_ref["pooled_output"]).abs().max())
    report["workflow"] = w
    with open(spec["out"], "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    _worker(sys.argv[1])
