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
    from tools.comfy_fetch import ROOT

    def variant(text, seed, offload=False, matmul="auto"):
        return tiny_api(host, "x2i_sampler.json", X2IMLLMEncode={"text": text}, X2ISampler={"seed": seed},
                        X2IMLLMLoader={"offload_after_encode": offload, "cpu_matmul": matmul})

    prompts = {"a": variant("a red fox", 0), "b": variant("a blue whale", 0), "a2": variant("a red fox", 7),
               "off": variant("a green parrot", 0, offload=True),
               "torch": variant("a red fox", 0, matmul="torch")}
    out = str(tmp_path / "x.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompts": prompts,
                                "capture": {"a": ["5"], "torch": ["5"]}, "out": out}))
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
    # cpu_matmul: 'auto' (oneDNN-packed on this CPU) and 'torch' (nn.Linear) encode alike; another loader setting
    # is another model, so the encode runs again
    from safetensors.torch import load_file

    got = load_file(out)
    assert calls["torch"] == calls["off"] + 1
    assert torch.allclose(got["a:5.hidden"], got["torch:5.hidden"], atol=1e-5, rtol=0)
    assert torch.equal(got["a:5.mask"], got["torch:5.mask"])


# -- cpu_matmul: the decoder's products through oneDNN with packed weights (x2i_core.mllm.packed) ----------------

def _onednn():
    from x2i_core.mllm.packed import onednn_available

    return onednn_available(torch.float32)


def test_cpu_matmul_choice_is_resolved_and_refused_where_it_cannot_run():
    from x2i_core.errors import X2IInputError
    from x2i_core.mllm.packed import resolve_cpu_matmul

    assert resolve_cpu_matmul("auto", "cuda", torch.float32) == "torch"
    assert resolve_cpu_matmul("auto", "cpu", torch.bfloat16) == "torch"  # bf16: small gain, slower at 512 rows
    assert resolve_cpu_matmul("auto", "cpu", torch.float32, quant="int8") == "torch"
    assert resolve_cpu_matmul("torch", "cpu", torch.float32) == "torch"
    assert resolve_cpu_matmul("auto", "cpu", torch.float32) == ("onednn" if _onednn() else "torch")
    with pytest.raises(X2IInputError, match=r"cpu_matmul 'fast' is unknown; expected one of \['auto', 'torch', "
                                            r"'onednn'\]"):
        resolve_cpu_matmul("fast", "cpu", torch.float32)
    with pytest.raises(X2IInputError, match="runs on the CPU; this one runs on cuda"):
        resolve_cpu_matmul("onednn", "cuda", torch.float32)
    with pytest.raises(X2IInputError, match="quantisation 'int8' replaces them"):
        resolve_cpu_matmul("onednn", "cpu", torch.float32, quant="int8")
    with pytest.raises(X2IInputError, match="fp32 or bf16"):
        resolve_cpu_matmul("onednn", "cpu", torch.float16)


@pytest.mark.skipif(not _onednn(), reason="this torch has no oneDNN (mkldnn) linear")
def test_packed_linear_matches_nn_linear_and_unpacks_exactly_when_moved():
    from x2i_core.errors import X2IInputError
    from x2i_core.mllm.packed import PackedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160)
    packed = PackedLinear(lin)
    assert not any(n == "weight" for n, _ in packed.named_parameters())  # the packed copy replaced it
    x = torch.randn(2, 37, 96)
    with torch.inference_mode():
        ref, got = lin(x), packed(x)
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5
    with pytest.raises(X2IInputError, match="inference only"):
        packed(x.requires_grad_())
    packed.to(torch.bfloat16)  # a move unpacks first (exact), then converts like any module
    assert packed.packed is None and torch.equal(packed.weight, lin.weight.detach().to(torch.bfloat16))
    assert torch.equal(packed(x.detach().bfloat16()), lin.to(torch.bfloat16)(x.detach().bfloat16()))


@pytest.mark.skipif(not _onednn(), reason="this torch has no oneDNN (mkldnn) linear")
def test_packed_encoder_encodes_like_nn_linear_for_every_preset(tiny):
    from x2i_core.mllm.packed import PackedLinear

    dense = load_mllm(tiny["mllm"], dtype="fp32", cpu_matmul="torch")
    packed = load_mllm(tiny["mllm"], dtype="fp32")  # auto: packed on this CPU
    assert (dense.cpu_matmul, packed.cpu_matmul) == ("torch", "onednn")
    n_layers = len(packed.decoder_layers)
    assert sum(isinstance(m, PackedLinear) for m in packed.decoder_layers.modules()) == 7 * n_layers
    assert packed.cache_tag != dense.cache_tag  # encode caches keep the two apart
    reqs = [EncodeRequest(text="a red fox in the snow"), EncodeRequest(text="ein Leuchtturm im Sturm, Öl auf Leinwand")]
    for preset in ("training", "comfyui", "scripts"):
        a, b = dense.encode(reqs, preset), packed.encode(reqs, preset)
        assert torch.equal(a.attention_mask, b.attention_mask)
        assert (a.hidden - b.hidden).abs().max().item() <= 1e-5, preset
    # the reasoning node's generate() runs through the packed layers too (one row per new token)
    (text_a, states_a), (text_b, states_b) = (e.generate_answer(EncodeRequest(text="describe a fox"),
                                                                 max_new_tokens=4) for e in (dense, packed))
    assert text_a == text_b and (states_a.hidden - states_b.hidden).abs().max().item() <= 1e-5
