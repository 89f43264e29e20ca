"""CritiPrefill sparse prefill (x2i_core.mllm.critiprefill) on the tiny Qwen2.5-VL (2 layers, width 64).

* budget keeping every block == dense (<= 1e-5, fp32), left / right / no padding, through the full
  block-gather path (``gather_all``) and through the plain path;
* a real budget differs from dense but stays close (cosines of hidden states and AlignNet outputs printed);
* masked keys stay masked; short inputs under ``auto`` are untouched; configs and cache tags are restored.
"""

import pytest
import torch
import torch.nn.functional as F

from x2i_core.errors import X2IInputError
from x2i_core.mllm import EncodeRequest, load_mllm
from x2i_core.mllm.critiprefill import (
    NAME,
    CritiPrefillConfig,
    PrefillStats,
    attention_lse,
    sparse_attention,
    sparse_prefill,
)
from x2i_core.tiny import build_alignnet, build_qwen25vl

TOL = 1e-5
S = 300
SMALL = dict(segment=32, block=8, local=8, probes=4, min_length=64)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    folder = build_qwen25vl(str(tmp_path_factory.mktemp("critiprefill") / "qwen"))
    return load_mllm(folder, dtype="fp32")


def _batch(enc, side: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(enc.processor.tokenizer) - 20  # plain tokens (the specials sit at the end)
    ids = torch.randint(0, vocab, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    if side == "left":
        mask[0, :40] = 0
        mask[1, :3] = 0
    elif side == "right":
        mask[0, -40:] = 0
        mask[1, -77:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _cos(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_budget_keeping_every_block_equals_dense(enc, side):
    batch = _batch(enc, side)
    dense = enc.forward_hidden(batch)
    for gather_all in (True, False):
        cfg = CritiPrefillConfig(budget=None, dense_layers=0, gather_all=gather_all, **SMALL)
        with sparse_prefill(enc, cfg) as st:
            ours = enc.forward_hidden(batch)
        assert st.delegated == 0 and st.sparse_layers + st.dense_layers == 2
        if gather_all:
            assert st.sparse_layers == 2  # the block-gather path really ran
        diff = (ours - dense).abs().max().item()
        assert diff <= TOL, f"{side} gather_all={gather_all}: max abs diff {diff}"


def test_real_budget_differs_but_stays_close(enc, capsys):
    net = build_alignnet(channels=3, hidden=64)
    report = []
    for side in ("none", "right"):
        batch = _batch(enc, side, seed=1)
        dense = enc.forward_hidden(batch)
        cfg = CritiPrefillConfig(budget=96, dense_layers=1, **SMALL)
        with sparse_prefill(enc, cfg) as st:
            sparse = enc.forward_hidden(batch)
        assert st.sparse_layers == 1 and st.dense_layers == 1 and st.kept_fraction < 0.6
        assert (sparse - dense).abs().max().item() > 1e-3  # blocks really were skipped
        assert (sparse[:, :2] - dense[:, :2]).abs().max().item() <= TOL  # embeddings + the dense first layer
        with torch.inference_mode():
            pd, sd = net(dense)
            ps, ss = net(sparse)
        row = dict(side=side, kept=st.kept_fraction, last=_cos(sparse[:, -1], dense[:, -1]),
                   update=_cos(sparse[:, -1] - sparse[:, 0], dense[:, -1] - dense[:, 0]),
                   align_seq=_cos(ss, sd), align_pooled=_cos(ps, pd))
        report.append(row)
        assert row["last"] > 0.95 and row["align_seq"] > 0.95 and row["align_pooled"] > 0.95
    with capsys.disabled():
        for r in report:
            print(f"\n[critiprefill tiny] padding {r['side']}: kept {100 * r['kept']:.0f}% of pairs, cos last layer "
                  f"{r['last']:.5f}, update {r['update']:.5f}, AlignNet seq {r['align_seq']:.5f} pooled "
                  f"{r['align_pooled']:.5f}")


def test_masked_keys_stay_masked_with_a_real_budget(enc):
    """Long left padding: the only blocks a real query loses are pad blocks, so even a tight budget is exact."""
    batch = _batch(enc, "none")
    batch["attention_mask"][0, :250] = 0
    batch["attention_mask"][1, :260] = 0
    dense = enc.forward_hidden(batch)
    cfg = CritiPrefillConfig(budget=80, dense_layers=0, **SMALL)  # 10 blocks: sink + local + own + 4 picks
    with sparse_prefill(enc, cfg) as st:
        ours = enc.forward_hidden(batch)
    assert st.sparse_layers == 2 and st.kept_fraction < 0.6
    assert (ours - dense).abs().max().item() <= TOL


def test_short_input_under_auto_runs_the_original_attention(enc):
    batch = _batch(enc, "right")
    dense = enc.forward_hidden(batch)
    with sparse_prefill(enc, "auto") as st:  # min_length 4096 > 300 tokens
        ours = enc.forward_hidden(batch)
    assert torch.equal(ours, dense)
    assert st.sparse_layers == 0 and st.dense_layers == 0 and st.delegated == 2
    with sparse_prefill(enc, "off") as st:
        assert enc.model.language_model.config._attn_implementation != NAME
        assert torch.equal(enc.forward_hidden(batch), dense)


def test_switch_is_scoped_to_the_text_decoder_and_restored(enc):
    text_cfg = enc.model.language_model.config
    vision_cfg = enc.model.visual.config
    before = (text_cfg._attn_implementation, vision_cfg._attn_implementation, enc.cache_tag)
    with pytest.raises(RuntimeError, match="boom"):
        on = CritiPrefillConfig(mode="on", **{k: v for k, v in SMALL.items() if k != "min_length"})
        with sparse_prefill(enc, on):
            assert text_cfg._attn_implementation == NAME
            assert vision_cfg._attn_implementation == before[1]
            assert enc.cache_tag != before[2]  # encode caches keep sparse and dense apart
            raise RuntimeError("boom")
    assert (text_cfg._attn_implementation, vision_cfg._attn_implementation, enc.cache_tag) == before


def test_encode_with_an_image_and_generate_under_sparse_prefill(enc):
    """encode() (vision tower + right padding to >= 512) and generate() (KV cache) inside the block."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(100, 120, 3) * 255).astype(np.uint8))
    req = EncodeRequest(text="Combine these pictures.", images=[img])
    dense = enc.encode(req, preset="comfyui").hidden
    cfg = CritiPrefillConfig(budget=None, dense_layers=0, gather_all=True, **SMALL)
    with sparse_prefill(enc, cfg) as st:
        ours = enc.encode(req, preset="comfyui").hidden
    assert st.sparse_layers == 2 and (ours - dense).abs().max().item() <= TOL
    ids = enc.processor.tokenizer("a red fox in the snow " * 12, return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        ref = enc.generator().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        with sparse_prefill(enc, cfg) as st:
            out = enc.generator().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(ref, out)
    assert st.sparse_layers == 2 and st.delegated > 0  # prefill ours, decode steps the original


def _reference(q, k, v, valid, scale):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    n = q.shape[2]
    m = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    if valid is not None:
        m = m & valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale).nan_to_num(0).transpose(1, 2)


def test_sparse_attention_function_gqa_odd_lengths_and_padding():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, n, D = 2, 4, 2, 203, 8
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h in (H, Hkv, Hkv))
    left = torch.ones(B, n, dtype=torch.bool)
    left[0, :37] = False
    right = torch.ones(B, n, dtype=torch.bool)
    right[1, 150:] = False
    for valid in (None, left, right):
        ref = _reference(q, k, v, valid, 0.3)
        for cfg in (CritiPrefillConfig(segment=32, block=8, local=8, budget=None, gather_all=True, probes=4),
                    CritiPrefillConfig(segment=32, block=16, local=0, budget=None, gather_all=True, probes=4),
                    CritiPrefillConfig(segment=32, block=8, budget=None)):
            st = PrefillStats()
            out = sparse_attention(q, k, v, valid, 0.3, cfg, stats=st)
            assert out.shape == (B, n, H, D)
            assert (out - ref).abs().max().item() <= 1e-5
        st = PrefillStats()
        out = sparse_attention(q, k, v, valid, 0.3, CritiPrefillConfig(segment=32, block=8, local=8, budget=64),
                               stats=st)
        assert 0.3 < st.kept_fraction < 0.6 and torch.isfinite(out).all()


def test_attention_lse_matches_the_maths():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 3, 1, 40, generator=g) > 0.4
    mask[1, 2] = False
    s = (q @ k.transpose(-1, -2)) * 0.25
    for causal, m in ((False, None), (True, None), (False, mask)):
        t = s
        if causal:
            t = t.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
        if m is not None:
            t = t.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(t, -1)
        o, got_lse = attention_lse(q, k, v, 0.25, causal=causal, mask=m)
        assert torch.allclose(o, torch.softmax(t, -1).nan_to_num(0) @ v, atol=1e-5)
        assert torch.equal(torch.isfinite(got_lse), torch.isfinite(lse))
        assert torch.allclose(got_lse[torch.isfinite(got_lse)], lse[torch.isfinite(lse)], atol=1e-5)


def test_config_parsing_and_validation():
    c = CritiPrefillConfig.parse("auto,budget=2048,segment=256,block=64")
    assert (c.mode, c.budget, c.segment, c.block) == ("auto", 2048, 256, 64)
    assert CritiPrefillConfig.parse("on,budget=all").budget is None
    assert CritiPrefillConfig.parse(None).mode == "off" and CritiPrefillConfig.parse("dense").mode == "off"
    assert CritiPrefillConfig.parse({"mode": "on"}).applies(10)
    assert not CritiPrefillConfig().applies(4095) and CritiPrefillConfig().applies(4096)
    for bad in ("sometimes", "auto,segment=100,block=64", "auto,budget=256", "auto,nonsense=1", "auto,budget=x"):
        with pytest.raises(X2IInputError):
            CritiPrefillConfig.parse(bad)


def test_encode_prefill_option_and_cache_keep_dense_and_sparse_apart():
    """The encode option: 'off' equals dense; 'on' with every block kept equals it too; cache entries differ."""
    import tempfile

    from x2i_core.mllm import EncodeRequest, load_mllm
    from x2i_core.mllm.cache import EncodeCache
    from x2i_core.tiny import build_qwen25vl

    with tempfile.TemporaryDirectory() as tmp:
        enc = load_mllm(build_qwen25vl(tmp + "/m"), dtype="fp32")
    enc.cache = EncodeCache()
    req = EncodeRequest(text="a red fox in the snow " * 20)
    dense = enc.encode(req, "comfyui").hidden
    assert torch.equal(enc.encode(req, "comfyui", prefill="off").hidden, dense)
    full = enc.encode(req, "comfyui", prefill="on,budget=None,segment=64,block=32,local=32,dense_layers=0,"
                                                 "gather_all=True").hidden
    assert (full - dense).abs().max().item() <= 1e-5
    assert len(enc.cache) == 2  # the sparse run has its own cache entry


def test_importing_registers_nothing_with_transformers():
    """Registration happens on first use (sparse_prefill), not at import."""
    import subprocess
    import sys

    code = ("import x2i_core.mllm.critiprefill as c\n"
            "from transformers import AttentionInterface\n"
            "assert c.NAME not in AttentionInterface._global_mapping, 'registered at import'\n"
            "c.register()\n"
            "assert c.NAME in AttentionInterface._global_mapping\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_encode_cache_size_is_read_when_a_cache_is_made(monkeypatch):
    from x2i_core.errors import X2IInputError
    from x2i_core.mllm.cache import EncodeCache

    monkeypatch.setenv("X2I_ENCODE_CACHE_MB", "2")
    assert EncodeCache().max_bytes == 2 * 2**20
    monkeypatch.setenv("X2I_ENCODE_CACHE_MB", "lots")
    with pytest.raises(X2IInputError, match="X2I_ENCODE_CACHE_MB"):
        EncodeCache()
