"""LoRA training under X2I conditioning; the file in ComfyUI's stock loader and in diffusers."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers.datasets import lora_dataset as make_dataset
from helpers.trainers import lora_args, run_cli
from x2i_core.train.runtime import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args, env=None, check=True, timeout=900):
    return run_cli("train-lora", *args, env=env, check=check, timeout=timeout)


small_args = lora_args


@pytest.mark.slow
def test_loss_falls_on_image_and_text_data_and_file_layout(tiny, tmp_path):
    data = make_dataset(str(tmp_path / "data"), corrupt=True)
    out = tmp_path / "out"
    train(*small_args(tiny, data, out, "train.steps=150", "checkpoint.every=0", "lora.alpha=4", "samples.every=150",
                      "samples.steps=2", "samples.size=32"))
    assert len(os.listdir(out / "samples")) == 1  # sample images from the fixed prompts
    ev = json.loads((out / "eval.json").read_text())
    print(f"fixed-noise flow-matching loss: {ev['fixed_noise_loss_start']:.4f} -> {ev['fixed_noise_loss_end']:.4f}")
    assert ev["fixed_noise_loss_end"] < 0.9 * ev["fixed_noise_loss_start"]
    report = json.loads((out / "data_report.json").read_text())
    assert report["samples"] == 5 and len(report["skipped_unreadable"]) == 1  # corrupt image skipped and counted
    sd = load_file(out / "lora.safetensors")
    assert all(k.startswith("transformer.") for k in sd)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in sd
    assert float(sd["transformer.transformer_blocks.0.attn.to_q.alpha"]) == 4.0  # alpha != rank is stored


@pytest.mark.slow
def test_resume_after_kill_is_exact(tiny, tmp_path):
    data = make_dataset(str(tmp_path / "data"))
    common = ("train.steps=12", "checkpoint.every=4")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    train(*small_args(tiny, data, ref, *common))
    r = train(*small_args(tiny, data, out, *common), env={"X2I_TEST_CRASH": "checkpoint:8"}, check=False)
    assert r.returncode == -signal.SIGKILL
    train(*small_args(tiny, data, out, *common))
    assert [row["loss"] for row in read_metrics(out)] == [row["loss"] for row in read_metrics(ref)]
    a, b = load_file(out / "lora.safetensors"), load_file(ref / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_jsonl_dataset_with_references(tmp_path):
    from x2i_core.train.lora import scan_dataset

    make_dataset(str(tmp_path), n=2)
    (tmp_path / "data.jsonl").write_text(
        '{"image": "img0.png", "caption": "a red square"}\n'
        '{"image": "edit.png", "caption": "at night", "references": ["ref0.png"]}\n')
    samples = scan_dataset(str(tmp_path / "data.jsonl"))
    assert [os.path.basename(s["image"].path) for s in samples] == ["img0.png", "edit.png"]
    assert [os.path.basename(r.path) for r in samples[1]["references"]] == ["ref0.png"]
    folder = scan_dataset(str(tmp_path))
    assert "ref0.png" not in [os.path.basename(s["image"].path) for s in folder]  # references are not targets


def test_tar_shard_dataset_and_bad_records(tmp_path):
    """WebDataset shards go through the same walker as LightControl's: images open lazily, captions from txt or
    json members, a JSONL line that is not an object is named by file and line."""
    import io
    import tarfile

    from PIL import Image

    from x2i_core.errors import X2IInputError
    from x2i_core.train.lora import scan_dataset

    def member(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        member(tf, "a/000.png", buf.getvalue())
        member(tf, "a/000.txt", b"a red square")
        member(tf, "a/001.jpg", b"not really a jpeg")
        member(tf, "a/001.json", b'{"caption": "broken image"}')
    samples = scan_dataset(str(tmp_path / "shard.tar"))
    assert [s["caption"] for s in samples] == ["a red square", "broken image"]
    assert samples[0]["image"].open().size == (40, 24)
    with pytest.raises(OSError):
        samples[1]["image"].open()  # the trainer skips and counts it
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n["not", "an", "object"]\n')
    with pytest.raises(X2IInputError, match=r"bad.jsonl:2 must be a JSON object"):
        scan_dataset(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("case", ["missing_caption", "rank", "no_images"])
def test_bad_datasets_and_settings_fail_clearly(tiny, tmp_path, case):
    data = str(tmp_path / "data")
    extra = []
    if case == "missing_caption":
        make_dataset(data, with_reference=False, missing_caption=True)
        needle = "img1.png"
    elif case == "rank":
        make_dataset(data, with_reference=False)
        extra, needle = ["lora.rank=64"], "larger than layer"
    else:
        os.makedirs(data)
        needle = "no captioned images"
    r = train(*small_args(tiny, data, tmp_path / "out", "train.steps=2", *extra), check=False, timeout=300)
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def big_lora(host, tmp_path_factory):
    """One training step on the stock-loadable 3072-wide FLUX (the ComfyUI single file), alpha != rank."""
    tmp = tmp_path_factory.mktemp("biglora")
    data = make_dataset(str(tmp / "data"), n=1, with_reference=False)
    out = tmp / "out"
    t = host["tiny"]
    train(f"mllm={t['mllm']}", f"alignnet={t['alignnet_safetensors']}", f"flux={t['flux']}",
          f"flux_transformer={t['comfy_flux']}", f"output_dir={out}", f"data.path={data}", "data.resolution=32",
          "data.buckets=false", "lora.rank=4", "lora.alpha=8", "train.steps=1", "train.lr=1e-2",
          "train.warmup_steps=0", "checkpoint.every=0")
    # Training moves B away from 0 only slightly in one step; scale it so the effect is clearly visible.
    sd = load_file(out / "lora.safetensors")
    sd = {k: (v * 50 if k.endswith("lora_B.weight") else v) for k, v in sd.items()}
    path = tmp / "x2i_lora.safetensors"
    save_file(sd, str(path))
    return str(path)


def _probe(host, lora, strength, inputs, tmp_path, name):
    spec = tmp_path / f"{name}.json"
    out = tmp_path / f"{name}.safetensors"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "unet": host["tiny"]["comfy_flux"], "lora": lora,
                                "strength": strength, "inputs": inputs, "out": str(out)}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_lora_probe.py"), str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return load_file(out)["v"], json.loads(open(str(out) + ".json").read())


@pytest.mark.comfy
def test_comfyui_maps_every_key_and_matches_diffusers(host, big_lora, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, generator=g)
    seq = torch.randn(1, 24, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    inputs = tmp_path / "inputs.safetensors"
    save_file({"x": x, "sigma": torch.tensor([0.7]), "seq": seq, "pooled": pooled,
               "guidance": torch.tensor([3.5])}, str(inputs))
    base, _ = _probe(host, None, 0.0, str(inputs), tmp_path, "base")
    zero, info0 = _probe(host, big_lora, 0.0, str(inputs), tmp_path, "zero")
    full, info1 = _probe(host, big_lora, 1.0, str(inputs), tmp_path, "full")
    assert info1["not_loaded"] == [] and info0["not_loaded"] == []  # every key maps onto FLUX
    assert torch.equal(zero, base)  # strength 0 reproduces the base output exactly
    assert (full - base).abs().max() > 1e-3  # and the LoRA changes it

    from diffusers import FluxPipeline

    from x2i_core.flux.convert import diffusers_flux_from_bfl
    from x2i_core.io import load_weights_file
    from x2i_core.train.flux_training import pack_latents, unpack_latents

    transformer = diffusers_flux_from_bfl({k: v.float() for k, v in
                                           load_weights_file(host["tiny"]["comfy_flux"]).tensors.items()})
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(os.path.dirname(big_lora), weight_name=os.path.basename(big_lora))
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32)
    with torch.no_grad():
        v = transformer(hidden_states=pack_latents(x), timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                        pooled_projections=pooled, encoder_hidden_states=seq, txt_ids=torch.zeros(24, 3),
                        img_ids=img_ids, return_dict=False)[0]
    v = unpack_latents(v, 4, 4)
    diff = (v - full).abs().max().item()
    scale = full.abs().max().item()
    print(f"diffusers vs ComfyUI one-step velocity with the LoRA: max abs diff {diff:.3g} (max |v| {scale:.3g})")
    assert diff <= 1e-4 * max(1.0, scale)


@pytest.mark.comfy
def test_trained_lora_in_the_shipped_workflow_with_stock_loader(host, big_lora):
    import shutil

    from helpers.comfy import tiny_api
    from tools.comfy_server import execution_error

    shutil.copy(big_lora, os.path.join(host["base"], "models", "loras", "trained_x2i_lora.safetensors"))
    s = host["server"]
    log_start = len(s.log())

    def run(wf, **over):
        over["X2IMLLMEncode"] = {"text": "a lighthouse in the trained style"}
        entry = s.run(tiny_api(host, wf, **over))
        assert execution_error(entry) is None, execution_error(entry)
        (img,) = s.output_images(entry)
        return np.asarray(Image.open(img))

    base = run("x2i_sampler.json")
    zero = run("x2i_lora.json", LoraLoaderModelOnly={"lora_name": "trained_x2i_lora.safetensors", "strength_model": 0.0})
    full = run("x2i_lora.json", LoraLoaderModelOnly={"lora_name": "trained_x2i_lora.safetensors", "strength_model": 1.0})
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, full)
    assert "lora key not loaded" not in s.log()[log_start:]


def test_lora_config_parses():
    from x2i_core.train.lora import LoraTrainingConfig
    from x2i_core.train.runtime import load_config

    cfg = load_config(LoraTrainingConfig, os.path.join(ROOT, "configs", "lora-24gb.yaml"))
    assert cfg["lora"]["rank"] == 16 and cfg["train"]["gradient_checkpointing"] is True
