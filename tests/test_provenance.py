"""AlignNet provenance: files record the MLLM they fit; loaders and the project node check it."""

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from x2i_core.alignnet import load_alignnet
from x2i_core.errors import X2IShapeError
from x2i_core.registry import KNOWN_MLLMS, MLLMIdentity, Provenance, candidates, check_fits, describe_dims
from x2i_core.tiny import build_alignnet, save_published_alignnet


def test_registry_knows_the_released_pairs_and_the_ambiguous_dimensions():
    assert {m.name for m in candidates(37, 2048)} >= {"Qwen2.5-VL-3B-Instruct", "InternVL2.5-4B"}
    assert {m.name for m in candidates(29, 3584)} >= {"Qwen2.5-VL-7B-Instruct", "MiniCPM-o-2.6", "Qwen2.5-Omni-7B"}
    assert next(m for m in KNOWN_MLLMS if m.name == "InternVL2.5-1B").alignnet == "scale"
    assert describe_dims(37, 2048).startswith("Qwen2.5-VL-3B-Instruct or InternVL2.5-4B")


def test_record_round_trips_and_a_wrong_family_is_refused_naming_both(tmp_path):
    net = build_alignnet(channels=3, hidden=64, seed=0)
    net.provenance = Provenance("qwen2.5-vl", "Qwen2.5-VL-3B-Instruct", 3, 64, "training", "reference")
    path = tmp_path / "a.safetensors"
    net.save(path)
    with safe_open(path, "pt") as fh:
        assert json.loads(fh.metadata()["x2i_mllm"])["family"] == "qwen2.5-vl"
    back = load_alignnet(path)
    assert back.provenance == net.provenance
    check_fits(back.provenance, 3, 64, MLLMIdentity("qwen2.5-vl", "Qwen2.5-VL-tiny", 3, 64))  # fits
    with pytest.raises(X2IShapeError) as info:
        check_fits(back.provenance, 3, 64, MLLMIdentity("internvl", "InternVL-tiny", 3, 64), "AlignNet 'a'")
    msg = str(info.value)
    assert "Qwen2.5-VL-3B-Instruct" in msg and "qwen2.5-vl" in msg and "InternVL-tiny" in msg and "internvl" in msg
    with pytest.raises(X2IShapeError, match="pad_rows 'reference'.*encoded with pad_rows 'constant'"):
        check_fits(back.provenance, 3, 64, MLLMIdentity("qwen2.5-vl", "x", 3, 64), "AlignNet 'a'", "constant")


def test_released_layout_loads_unchanged_and_is_recognised_by_name_and_config(tmp_path, caplog):
    net = build_alignnet(channels=29, hidden=64, seed=1)
    released = tmp_path / "qwen2.5-vl-7b_proj.pt"
    save_published_alignnet(net, str(released))
    # The name says 7B but the config says H=64: not the release; no record, no guess.
    assert load_alignnet(released).provenance is None
    real_7b = build_alignnet(channels=29, hidden=3584, seed=1)
    save_published_alignnet(real_7b, str(released))
    loaded = load_alignnet(released)
    assert loaded.provenance.model == "Qwen2.5-VL-7B-Instruct" and loaded.provenance.source == "released"
    assert loaded.provenance.pad_rows == "reference" and loaded.provenance.preset == "training"
    for k, v in real_7b.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # The same weights under another name: ambiguous (C=29, H=3584) -> a warning naming the candidates.
    other = tmp_path / "proj.pt"
    save_published_alignnet(real_7b, str(other))
    with caplog.at_level(logging.WARNING, logger="x2i"):
        assert load_alignnet(other).provenance is None
    assert "Qwen2.5-VL-7B-Instruct" in caplog.text and "MiniCPM-o-2.6" in caplog.text


def test_distilled_alignnet_records_its_mllm_and_pad_rows(tiny, tmp_path):
    import subprocess
    import sys

    from helpers.datasets import caption_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "x2i_core", "distill", f"mllm={tiny['mllm']}",
                        f"flux={tiny['flux_small']}", f"output_dir={out}",
                        f"data.paths=[{caption_file(tmp_path / 'c.txt')}]", "distill.resolution=32", "train.steps=1",
                        "checkpoint.every=0", "pad_rows=constant"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    prov = load_alignnet(out / "alignnet.safetensors").provenance
    assert (prov.family, prov.model, prov.channels, prov.hidden) == ("qwen2.5-vl", "Qwen2.5-VL-tiny", 3, 64)
    assert (prov.preset, prov.pad_rows, prov.source) == ("training", "constant", "trained")


@pytest.mark.comfy
def test_the_project_node_refuses_another_family_in_the_real_executor(host):
    from helpers.comfy import _expect_node_error, tiny_api
    from tools.comfy_server import execution_error

    folder = os.path.join(host["base"], "models", "x2i")
    for name, family, model in (("rec-qwen3b.safetensors", "qwen2.5-vl", "Qwen2.5-VL-3B-Instruct"),
                                ("rec-internvl4b.safetensors", "internvl", "InternVL2.5-4B")):
        net = build_alignnet(channels=3, hidden=64, seed=1)
        net.provenance = Provenance(family, model, 3, 64, "training", "reference")
        net.save(os.path.join(folder, name))
    # A Qwen2.5-VL AlignNet on an InternVL encoder, and the other way round: a node error naming both sides.
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", family="internvl",
                                      X2IAlignNetLoader={"alignnet_name": "rec-qwen3b.safetensors"}),
                       "X2IAlignNetProject", "Qwen2.5-VL-3B-Instruct", "qwen2.5-vl", "internvl", "InternVL-tiny")
    _expect_node_error(host, tiny_api(host, "x2i_sampler.json", family="qwen25vl",
                                      X2IAlignNetLoader={"alignnet_name": "rec-internvl4b.safetensors"}),
                       "X2IAlignNetProject", "InternVL2.5-4B", "internvl", "qwen2.5-vl", "Qwen2.5-VL-tiny")
    # The matching family runs.
    entry = host["server"].run(tiny_api(host, "x2i_sampler.json", family="qwen25vl",
                                        X2IAlignNetLoader={"alignnet_name": "rec-qwen3b.safetensors"}))
    assert execution_error(entry) is None


def test_presets_follow_the_registry_and_the_1b_release_is_the_scale_variant(tmp_path):
    from safetensors.torch import save_file

    from x2i_core.alignnet import AlignNet, AlignNetConfig

    cfg = AlignNetConfig.preset("internvl2.5-1b")
    assert (cfg.in_channels, cfg.input_dim, cfg.fusion) == (25, 896, "scale")
    assert AlignNetConfig.preset("internvl2.5-4b").fusion == "conv"
    # A bare training state dict of the 1B release loads with the preset (its cha_scale, no conv).
    net = AlignNet(cfg)
    bare = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    loaded = load_alignnet(bare, "internvl2.5-1b")
    assert "cha_scale" in loaded.state_dict() and loaded.config.fusion == "scale"
