"""Lean encoding: the encode cache, weight-only int8, offload after encode - standalone and in ComfyUI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from x2i_core.mllm import EncodeRequest, load_mllm
from x2i_core.mllm.cache import FORWARD_CALLS, EncodeCache


def _calls():
    return sum(FORWARD_CALLS.values())


def test_cache_returns_identical_states_without_running_the_mllm(tiny):
    enc = load_mllm(tiny["mllm"], dtype="fp32")
    enc.cache = EncodeCache()
    req = EncodeRequest(text="a red fox in the snow")
    a = enc.encode(req)
    n = _calls()
    b = enc.encode(EncodeRequest(text="a red fox in the snow"))
    assert _calls() == n  # a hit runs nothing
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.attention_mask, b.attention_mask)
    enc.encode(req, preset="comfyui")  # another preset: another forward
    assert _calls() == n + 1
    assert enc.cache.hits == 1 and len(enc.cache) == 2


def test_cache_is_bounded_lru(tiny):
    enc = load_mllm(tiny["mllm"], dtype="fp32")
    one = enc.encode(EncodeRequest(text="x")).hidden
    size = one.numel() * one.element_size()
    enc.cache = EncodeCache(max_bytes=2 * size)
    for t in ("a", "b", "c"):
        enc.encode(EncodeRequest(text=t))
    assert len(enc.cache) == 2 and enc.cache.bytes <= 2 * size
    n = _calls()
    enc.encode(EncodeRequest(text="c"))  # most recent: still there
    assert _calls() == n
    enc.encode(EncodeRequest(text="a"))  # evicted: runs again
    assert _calls() == n + 1


def test_int8_weight_only_stays_within_tolerance_of_bf16(tiny):
    """Documented tolerance: int8's relative error vs fp32 at most 3x bf16's, cosine >= 0.999 (hidden and AlignNet)."""
    from x2i_core.alignnet import load_alignnet
    from x2i_core.mllm.quant import Int8Linear

    ref = load_mllm(tiny["mllm"], dtype="fp32")
    q8 = load_mllm(tiny["mllm"], dtype="fp32", quant="int8")
    bf = load_mllm(tiny["mllm"], dtype="bf16")
    assert sum(isinstance(m, Int8Linear) for m in q8.model.modules()) == 7 * 2  # 7 projections x 2 layers
    net = load_alignnet(tiny["alignnet_safetensors"])
    cos = torch.nn.functional.cosine_similarity
    for text in ("a red fox in the snow", "一只可爱的小猫坐在窗台上"):
        req = EncodeRequest(text=text)
        h_ref, h8, hbf = (e.encode(req).hidden.float() for e in (ref, q8, bf))
        rel8 = ((h8 - h_ref).norm() / h_ref.norm()).item()
        relbf = ((hbf - h_ref).norm() / h_ref.norm()).item()
        assert rel8 <= 3 * relbf and rel8 < 0.05, (rel8, relbf)
        assert cos(h8.flatten(), h_ref.flatten(), dim=0) >= 0.999
        with torch.no_grad():
            p_ref, s_ref = net(h_ref)
            p8, s8 = net(h8)
        assert cos(s8.flatten(), s_ref.flatten(), dim=0) >= 0.999
        assert cos(p8.flatten(), p_ref.flatten(), dim=0) >= 0.999


def test_bitsandbytes_needs_cuda_and_says_so(tiny):
    from x2i_core.errors import X2IInputError

    with pytest.raises(X2IInputError, match="CUDA"):
        load_mllm(tiny["mllm"], quant="bnb4", device="cpu")
    with pytest.raises(X2IInputError, match="unknown"):
        load_mllm(tiny["mllm"], quant="int3")


@pytest.mark.comfy
def test_comfyui_reencodes_nothing_when_only_the_sampler_changes_and_offloads_after_encode(host, tmp_path):
    from helpers.comfy import tiny_api
    from tools.comfy_host import ROOT

    def variant(text, seed, offload=False):
        return tiny_api(host, "x2i_sampler.json", X2IMLLMEncode={"text": text},
                        X2ISampler={"seed": seed}, X2IMLLMLoader={"offload_after_encode": offload})

    prompts = {"a": variant("a red fox", 0), "b": variant("a blue whale", 0), "a2": variant("a red fox", 7),
               "off": variant("a green parrot", 0, offload=True)}
    out = str(tmp_path / "x.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompts": prompts,
                                "capture": {}, "out": out}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    facts = json.loads(open(out + ".json").read())
    assert facts["success"], facts["errors"]
    calls = facts["forward_calls"]
    assert calls["a"] >= 1 and calls["b"] == calls["a"] + 1
    assert calls["a2"] == calls["b"]  # back to prompt a with another seed: served from the encode cache
    # the MLLM stays loaded (managed) without the switch, and is gone right after the encode with it
    assert "Qwen2_5_VLForConditionalGeneration" in facts["loaded_after"]["a2"]
    assert "Qwen2_5_VLForConditionalGeneration" not in facts["loaded_after"]["off"]
    assert facts["managed_after"] == []  # /free's unload_all_models leaves none of our models loaded
