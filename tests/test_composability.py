"""X2I conditioning composed with the stock ComfyUI nodes users already combine (issue #18's matrix).

All cells run in one subprocess by one ComfyUI ``PromptExecutor`` (the shared loaders and encodes run once,
as in a server); FLUX evaluations are counted per prompt. See ``tests/helpers/composability.py``."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.composability import CACHE_STEPS, CELLS, EXPECTED_ERRORS, STEPS, cell_prompts, readme_table
from tools.comfy_fetch import ROOT

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def matrix(host, tmp_path_factory, pytestconfig):
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("matrix")
    names = {**host["names"], "controlnet": "tiny-flux-controlnet-xlabs.safetensors"}
    prompts, capture = cell_prompts(names)
    out = str(tmp / "matrix.safetensors")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({
        "comfy_dir": host["comfy_dir"], "base": host["base"], "prompts": prompts, "capture": capture, "out": out,
        "test_nodes": True, "controlnet": {"path": os.path.join(host["base"], "models", "controlnet", names["controlnet"]),
                                          "flux": host["tiny"]["comfy_flux"]}}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    facts = json.loads(open(out + ".json").read())
    unexpected = {k: v for k, v in facts["errors"].items() if k not in EXPECTED_ERRORS}
    assert not unexpected and set(facts["errors"]) == set(EXPECTED_ERRORS), facts["errors"]
    calls = facts["flux_calls"]
    _report(pytestconfig, "FLUX calls (batch rows) per cell: " +
            ", ".join(f"{k} {v['calls']} ({v['rows']})" for k, v in calls.items()))
    _report(pytestconfig, "seconds per cell: " + ", ".join(f"{k} {v:.1f}" for k, v in facts["seconds"].items()))
    return {"t": load_file(out), "facts": facts, "calls": calls}


def _report(pytestconfig, line: str) -> None:
    """A line in the test output even under output capture (the call counts the issue asks to see)."""
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


def latent(m, label, node="ks"):
    return m["t"][f"{label}:{label}.{node}.samples"]


def cond(m, label, node, i=0):
    key = f"{label}:{node}.{i}" if f"{label}:{node}.{i}.seq" in m["t"] else f"{label}:{label}.{node}.{i}"
    return m["t"][f"{key}.seq"], m["t"][f"{key}.pooled"], m["facts"].get(f"{key}.extra", {})


def calls_rows(m, label):
    return m["calls"][label]["calls"], m["calls"][label]["rows"]


def differs(a, b, at_least=1e-3):
    return (a - b).abs().max().item() > at_least


def test_matrix_covers_every_cell_and_the_readme_lists_it(matrix):
    ran = set(matrix["calls"])
    assert {cid for cid, *_ in CELLS} <= ran
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert readme_table() in readme, "README's composability table is stale: python -m tests.helpers.composability"


def test_baseline_one_flux_call_per_step(matrix):
    assert calls_rows(matrix, "baseline") == (STEPS, STEPS)
    assert calls_rows(matrix, "baseline_8") == (CACHE_STEPS, CACHE_STEPS)
    assert torch.isfinite(latent(matrix, "baseline")).all()


@pytest.mark.parametrize("kind", ["easycache", "lazycache"])
def test_stock_caches_skip_flux_calls_on_x2i_graphs(matrix, kind):
    calls = matrix["calls"]
    assert calls[kind]["calls"] < CACHE_STEPS, calls[kind]               # KSampler graph
    assert calls[f"{kind}_x2i"]["calls"] < calls["x2i_sampler"]["calls"] == CACHE_STEPS, calls  # X2I Sampler graph
    assert torch.isfinite(latent(matrix, kind)).all()
    if kind == "easycache":  # the same node with a zero threshold skips nothing: the drop is the cache's doing
        assert calls["easycache_off"]["calls"] == CACHE_STEPS


def test_sampler_custom_advanced_equals_ksampler(matrix):
    a, b = latent(matrix, "custom_basic", "sca"), latent(matrix, "baseline")
    assert (a - b).abs().max().item() <= 1e-5


def test_cfg_guider_runs_cond_and_uncond(matrix):
    assert matrix["calls"]["cfg_guider"]["rows"] == 2 * STEPS
    assert differs(latent(matrix, "cfg_guider", "sca"), latent(matrix, "baseline"))


def test_model_sampling_flux_changes_the_schedule(matrix):
    assert differs(latent(matrix, "model_sampling"), latent(matrix, "model_sampling_b"))


def test_flux_guidance_overrides_x2i_guidance(matrix):
    _, _, extra = cond(matrix, "flux_guidance", "g")
    assert extra["guidance"] == 8.0
    assert differs(latent(matrix, "flux_guidance"), latent(matrix, "baseline"))


def test_beta_scheduler(matrix):
    assert matrix["calls"]["beta_scheduler"]["calls"] == STEPS
    assert differs(latent(matrix, "beta_scheduler", "sca"), latent(matrix, "custom_basic", "sca"))


def test_batch_of_two(matrix):
    out = latent(matrix, "batch")
    assert out.shape[0] == 2 and calls_rows(matrix, "batch") == (STEPS, 2 * STEPS)
    assert (out[:1] - latent(matrix, "baseline")).abs().max().item() <= 1e-4  # same seed, same first noise
    assert differs(out[0], out[1])


def test_img2img_stays_near_the_source(matrix):
    src = matrix["t"]["img2img:source.samples"]
    out = latent(matrix, "img2img")
    assert (out - src).norm() < (latent(matrix, "baseline") - src).norm()
    assert differs(out, src)


def test_inpaint_mask_keeps_the_unmasked_half(matrix):
    src = matrix["t"]["inpaint:source.samples"]
    out = latent(matrix, "inpaint")
    w = src.shape[-1]
    keep = slice(w // 2 + 1, w)  # mask is 1 on the left half; one latent column of interpolation margin
    assert (out[..., keep] - src[..., keep]).abs().max().item() <= 1e-5
    assert differs(out[..., : w // 2 - 1], src[..., : w // 2 - 1])


def test_conditioning_combine(matrix):
    assert matrix["calls"]["combine"]["rows"] == 2 * STEPS   # both conds, batched
    out = latent(matrix, "combine")
    assert differs(out, latent(matrix, "baseline")) and differs(out, latent(matrix, "only_B"))


def test_conditioning_average_is_the_weighted_mean(matrix):
    seq, pooled, _ = cond(matrix, "average", "c")
    a_seq, a_pooled, _ = cond(matrix, "average", "A")
    b_seq, b_pooled, _ = cond(matrix, "average", "B")
    assert (seq - (0.25 * a_seq + 0.75 * b_seq)).abs().max().item() <= 1e-6
    assert (pooled - (0.25 * a_pooled + 0.75 * b_pooled)).abs().max().item() <= 1e-6


def test_conditioning_average_with_stock_t5_clip_of_other_length(matrix):
    seq, pooled, _ = cond(matrix, "average_stock", "c")
    a_seq, a_pooled, _ = cond(matrix, "average_stock", "A")
    t_seq, t_pooled, _ = cond(matrix, "average_stock", "T")
    n = t_seq.shape[1]
    assert n != a_seq.shape[1] and seq.shape == a_seq.shape  # lengths differ; the X2I ('to') length is kept
    assert (seq[:, :n] - 0.5 * (a_seq[:, :n] + t_seq)).abs().max().item() <= 1e-6
    assert (seq[:, n:] - 0.5 * a_seq[:, n:]).abs().max().item() <= 1e-6
    assert (pooled - 0.5 * (a_pooled + t_pooled)).abs().max().item() <= 1e-6
    assert torch.isfinite(latent(matrix, "average_stock")).all()


def test_conditioning_concat(matrix):
    seq, _, _ = cond(matrix, "concat", "c")
    assert seq.shape[1] == 1024
    assert differs(latent(matrix, "concat"), latent(matrix, "baseline"))


def test_timestep_ranges_switch_conditioning(matrix):
    calls = matrix["calls"]["timestep_range"]
    # one range active per step, except the step on the shared boundary (0.5), where both are
    assert calls["calls"] == STEPS and calls["rows"] <= STEPS + 1, calls
    out = latent(matrix, "timestep_range")
    assert differs(out, latent(matrix, "baseline")) and differs(out, latent(matrix, "only_B"))


def test_set_area(matrix):
    _, _, extra = cond(matrix, "set_area", "area")
    assert list(extra["area"]) and extra["strength"] == 1.0
    assert matrix["calls"]["set_area"]["rows"] == 2 * STEPS
    assert differs(latent(matrix, "set_area"), latent(matrix, "baseline"))


def test_zero_out_negative_with_cfg(matrix):
    assert matrix["calls"]["zero_out"]["rows"] == 2 * STEPS
    assert differs(latent(matrix, "zero_out"), latent(matrix, "baseline"))


def test_mixed_x2i_and_stock_conditioning(matrix):
    seqs = [cond(matrix, "mixed_combine", "c", i)[0] for i in (0, 1)]
    assert seqs[0].shape[1] != seqs[1].shape[1]
    out = latent(matrix, "mixed_combine")
    assert differs(out, latent(matrix, "baseline")) and differs(out, latent(matrix, "only_T"))


def test_lightcontrol_chained_with_a_stock_controlnet_and_a_lora(matrix):
    calls = matrix["calls"]
    assert calls["control_chain"]["controlnet_calls"] == STEPS == calls["controlnet_only"]["controlnet_calls"]
    assert calls["lightcontrol_only"]["controlnet_calls"] == 0 and calls["control_chain"]["calls"] == STEPS
    chain = latent(matrix, "control_chain")
    for other in ("lightcontrol_only", "controlnet_only", "lora_only", "control_chain_no_lora"):
        assert differs(chain, latent(matrix, other)), other
    assert differs(latent(matrix, "lightcontrol_only"), latent(matrix, "lora_only"))


def test_blend_node_mixes_predictions_by_weight(matrix):
    entries = [cond(matrix, "x2i_blend", "b", i)[2] for i in (0, 1)]
    assert [e["strength"] for e in entries] == pytest.approx([0.7, 0.3])
    a, t, out = (latent(matrix, k) for k in ("only_A_1", "only_T_1", "x2i_blend"))
    assert (out - (0.7 * a + 0.3 * t)).abs().max().item() <= 1e-4
    assert differs(out, a) and differs(out, t)


def test_blend_node_refuses_conditioning_of_another_model(matrix):
    for label, needle in EXPECTED_ERRORS.items():
        (message,) = matrix["facts"]["errors"][label]
        assert "X2I Blend Conditioning" in message and needle in message, message


@pytest.mark.slow
def test_torch_compile_on_an_x2i_graph(host, tmp_path):
    """Stock TorchCompileModel (inductor) on the FLUX that X2I conditioning drives: same latent as eager."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("TorchCompileModel needs a C++ compiler for inductor's CPU code; none on this machine")
    from safetensors.torch import load_file

    from helpers.composability import _n, ksampler, shared_nodes

    base = shared_nodes(host["names"])
    keep = {k: base[k] for k in ("unet", "mllm", "encA", "align", "A", "negA", "empty")}
    eager = {**keep, "ks": ksampler(["unet", 0], ["A", 0], ["negA", 0], ["empty", 0], steps=2),
             "save": _n("SaveLatent", samples=["ks", 0], filename_prefix="matrix/eager")}
    compiled = {**keep, "tc": _n("TorchCompileModel", model=["unet", 0], backend="inductor"),
                "ks2": ksampler(["tc", 0], ["A", 0], ["negA", 0], ["empty", 0], steps=2),
                "save2": _n("SaveLatent", samples=["ks2", 0], filename_prefix="matrix/compiled")}
    out = str(tmp_path / "compile.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"],
                                "prompts": {"eager": eager, "compiled": compiled},
                                "capture": {"eager": ["ks"], "compiled": ["ks2"]}, "out": out}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    facts = json.loads(open(out + ".json").read())
    assert facts["success"], facts["errors"]
    t = load_file(out)
    diff = (t["compiled:ks2.samples"] - t["eager:ks.samples"]).abs().max().item()
    print(f"\nTorchCompileModel: max abs diff to eager {diff:.2e}; seconds {facts['seconds']}")
    assert diff <= 1e-3
    assert facts["flux_calls"]["compiled"]["calls"] == 2
