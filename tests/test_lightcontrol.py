"""LightControl: the model, its ComfyUI CONTROL_NET, parity with the diffusers path, training."""

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

from helpers.datasets import edit_triples as make_triples
from helpers.trainers import lightcontrol_args, run_cli
from x2i_core.errors import X2IFileError, X2IInputError
from x2i_core.lightcontrol import LightControl, LightControlConfig, inject, load_lightcontrol
from x2i_core.train.runtime import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_published_layout_names_and_any_size_divisible_by_16(tmp_path):
    lc = LightControl(LightControlConfig(num_modules=19, out_dim=24))
    sd = lc.state_dict()
    for key in ("0.time_embedding.linear_1.weight", "0.embedding.0.weight", "0.embedding.7.weight",
                "0.down_res.0.conv1.weight", "0.down_res.1.conv_shortcut.weight", "0.down_sample.1.conv.weight",
                "0.mid_convs.0.3.weight", "18.mid_convs.1.weight"):
        assert key in sd, key
    assert sd["0.mid_convs.1.weight"].shape == (24, 256, 2, 2)
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "diffusion_pytorch_model.bin")
    loaded = load_lightcontrol(tmp_path / "diffusion_pytorch_model.bin")
    assert loaded.config.num_modules == 19 and loaded.config.out_dim == 24
    lc.save(tmp_path / "ours.safetensors")
    ours = load_lightcontrol(tmp_path / "ours.safetensors")
    hint = torch.rand(2, 3, 48, 80) * 2 - 1
    a, b = lc(hint, torch.tensor([700.0]), num_blocks=3), ours(hint, torch.tensor([700.0]), num_blocks=3)
    assert len(a) == 3  # a FLUX with fewer double blocks uses the first modules
    assert a[0].shape == (2, (48 // 16) * (80 // 16), 24)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(X2IInputError, match="multiples of 16"):
        lc(torch.rand(1, 3, 40, 64), torch.tensor([1.0]))
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(X2IFileError, match="not a LightControl"):
        load_lightcontrol(tmp_path / "other.safetensors")


def test_own_blocks_equal_the_diffusers_blocks_they_replace():
    """The modules are built from our own blocks (the nodes need no diffusers); a module assembled from diffusers'
    Timesteps / TimestepEmbedding / ResnetBlock2D / Downsample2D (the published training code's parts) has the same
    state-dict names and shapes, and given the same weights computes the same residuals."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D

    cfg = LightControlConfig(num_modules=1, out_dim=48)
    ours = LightControl(cfg).blocks[0].eval()
    theirs = LightControl(cfg).blocks[0].eval()
    theirs.time_proj = Timesteps(128, True, downscale_freq_shift=0)
    theirs.time_embedding = TimestepEmbedding(128, cfg.time_embed_dim)
    theirs.down_res = torch.nn.ModuleList(
        ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=cfg.time_embed_dim, groups=g)
        for i, o, g in zip(cfg.in_channels, cfg.out_channels, cfg.groups))
    theirs.down_sample = torch.nn.ModuleList(Downsample2D(o, use_conv=True, out_channels=o, padding=1, name="op")
                                             for o in cfg.out_channels)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    theirs.load_state_dict(ours.state_dict())
    hint = torch.rand(2, 3, 64, 48) * 2 - 1
    for t in (torch.tensor([1000.0]), torch.tensor([3.5, 871.25])):
        with torch.no_grad():
            a, b = ours(hint, t), theirs(hint, t)
        assert a.shape == (2, 12, 48)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_lightcontrol_imports_no_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import torch\nfrom x2i_core.lightcontrol import LightControl, LightControlConfig\n"
            "m = LightControl(LightControlConfig(num_modules=2, out_dim=8))\n"
            "r = m(torch.zeros(1, 3, 32, 32), torch.tensor([500.0]))\n"
            "assert len(r) == 2 and r[0].shape == (1, 4, 8), r[0].shape\n"
            "assert 'diffusers' not in [k for k, v in sys.modules.items() if v is not None]\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_residual_token_order_matches_flux_patches():
    """Tokens are the 16x16-pixel patches in row-major order: shifting the image by one patch to the right
    shifts every interior token by one column (GroupNorm statistics are unchanged by a circular roll)."""
    torch.manual_seed(0)
    lc = LightControl(LightControlConfig(num_modules=1, out_dim=8))
    img = torch.rand(1, 3, 96, 384) * 2 - 1
    rows, cols = 96 // 16, 384 // 16
    a = lc(img, torch.tensor([500.0]))[0].reshape(1, rows, cols, 8)
    b = lc(torch.roll(img, shifts=16, dims=3), torch.tensor([500.0]))[0].reshape(1, rows, cols, 8)
    inner = slice(8, 15)
    shifted = (b[:, 2:4, 9:16] - a[:, 2:4, inner]).abs().max()
    unshifted = (b[:, 2:4, inner] - a[:, 2:4, inner]).abs().max()
    # (border content moves, so GroupNorm statistics move a little: near-equal, not bit-equal)
    assert shifted < 0.05 and unshifted > 20 * shifted, (shifted, unshifted)


def _image_inputs(tmp_path, h=4, w=6, tokens=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.RandomState(seed)
    image = torch.from_numpy(rng.rand(1, h * 8, w * 8, 3).astype(np.float32))
    inputs = {"x": torch.randn(1, 16, h, w, generator=g), "sigma": torch.tensor([0.6]),
              "seq": torch.randn(1, tokens, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g),
              "guidance": torch.tensor([3.5]), "image": image}
    path = tmp_path / "inputs.safetensors"
    save_file(inputs, str(path))
    return inputs, str(path)


@pytest.mark.comfy
def test_comfyui_controlnet_matches_diffusers_injection(host, tmp_path):
    inputs, path = _image_inputs(tmp_path)
    spec = tmp_path / "spec.json"
    out = tmp_path / "probe.safetensors"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "unet": host["tiny"]["comfy_flux"],
                                "lightcontrol_name": host["names"]["lightcontrol"], "inputs": path, "out": str(out)}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_lightcontrol_probe.py"), str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    got = load_file(out)
    facts = json.loads(open(str(out) + ".json").read())
    assert "_Holder" in facts["managed"]  # the modules are a managed model that loads with the UNet

    lc = load_lightcontrol(host["tiny"]["comfy_lightcontrol"])
    hint = inputs["image"][..., :3].movedim(-1, 1) * 2.0 - 1.0  # ComfyUI IMAGE [B,H,W,C] 0..1 -> [B,3,H,W] -1..1
    residuals = lc(hint, inputs["sigma"] * 1000.0)
    assert torch.allclose(got["r_0"], residuals[0], atol=1e-5, rtol=1e-5)  # same residuals in both paths
    assert torch.allclose(got["chain_0"], 2 * residuals[0], atol=1e-4, rtol=1e-5)  # chaining adds them
    assert torch.equal(got["v_late"], got["v_plain"])  # start_percent 0.9: inactive at sigma 0.6 (FLUX shift)
    assert (got["v_lc"] - got["v_plain"]).abs().max() > 1e-3  # strength 1 changes the prediction
    assert (got["v_half"] - got["v_plain"]).abs().max() < (got["v_lc"] - got["v_plain"]).abs().max()

    from diffusers import FluxPipeline

    from x2i_core.flux.convert import diffusers_flux_from_bfl
    from x2i_core.io import load_weights_file
    from x2i_core.train.flux_training import pack_latents, unpack_latents

    flux = diffusers_flux_from_bfl({k: v.float() for k, v in load_weights_file(host["tiny"]["comfy_flux"]).tensors.items()})
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32)
    with torch.no_grad(), inject(flux, residuals):
        v = flux(hidden_states=pack_latents(inputs["x"]), timestep=inputs["sigma"], guidance=inputs["guidance"],
                 pooled_projections=inputs["pooled"], encoder_hidden_states=inputs["seq"],
                 txt_ids=torch.zeros(24, 3), img_ids=img_ids, return_dict=False)[0]
    v = unpack_latents(v, 4, 6)
    diff = (v - got["v_lc"]).abs().max().item()
    print(f"LightControl: diffusers vs ComfyUI one-step velocity, max abs diff {diff:.3g}")
    assert diff <= 1e-4 * max(1.0, got["v_lc"].abs().max().item())


@pytest.mark.comfy
def test_edit_workflow_strength_zero_is_exact_and_one_changes(host):
    from helpers.comfy import tiny_api
    from tools.comfy_server import execution_error

    s = host["server"]

    def run(strength):
        entry = s.run(tiny_api(host, "x2i_edit_lightcontrol.json", ControlNetApplyAdvanced={"strength": strength}))
        assert execution_error(entry) is None, execution_error(entry)
        (img,) = s.output_images(entry)
        return np.asarray(Image.open(img))

    zero, one = run(0.0), run(1.0)
    api = tiny_api(host, "x2i_edit_lightcontrol.json")
    # the same graph without LightControl: KSampler fed straight from the projection
    ks = next(k for k, v in api.items() if v["class_type"] == "KSampler")
    proj = next(k for k, v in api.items() if v["class_type"] == "X2IAlignNetProject")
    zo = next(k for k, v in api.items() if v["class_type"] == "ConditioningZeroOut")
    api[ks]["inputs"]["positive"] = [proj, 0]
    api[ks]["inputs"]["negative"] = [zo, 0]
    for k in [k for k, v in api.items() if v["class_type"] in ("ControlNetApplyAdvanced", "X2ILightControlLoader")]:
        del api[k]
    entry = s.run(api)
    (img,) = s.output_images(entry)
    plain = np.asarray(Image.open(img))
    assert np.array_equal(zero, plain)
    assert not np.array_equal(one, plain)


def train(*args, env=None, check=True):
    return run_cli("train-lightcontrol", *args, env=env, check=check)


base_args = lightcontrol_args


@pytest.mark.slow
def test_trainer_loss_falls_and_resume_is_exact(tiny, tmp_path):
    data = make_triples(str(tmp_path / "data"))
    out = tmp_path / "out"
    train(*base_args(tiny, data, out, "train.steps=60", "checkpoint.every=0"))
    ev = json.loads((out / "eval.json").read_text())
    print(f"LightControl fixed-noise loss {ev['fixed_noise_loss_start']:.4f} -> {ev['fixed_noise_loss_end']:.4f}")
    assert ev["fixed_noise_loss_end"] < 0.9 * ev["fixed_noise_loss_start"]
    assert load_lightcontrol(out / "lightcontrol.safetensors").config.out_dim == 32

    common = ("train.steps=9", "checkpoint.every=3")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train(*base_args(tiny, data, ref, *common))
    r = train(*base_args(tiny, data, killed, *common), env={"X2I_TEST_CRASH": "checkpoint:6"}, check=False)
    assert r.returncode == -signal.SIGKILL
    train(*base_args(tiny, data, killed, *common))
    assert [x["loss"] for x in read_metrics(killed)] == [x["loss"] for x in read_metrics(ref)]


@pytest.mark.comfy
def test_trained_lightcontrol_runs_in_the_node(host, tmp_path):
    """Train 1 step against the stock-loadable 3072-wide FLUX, then use the file in the edit workflow."""
    from helpers.comfy import tiny_api
    from tools.comfy_server import execution_error

    data = make_triples(str(tmp_path / "data"), n=1)
    t = host["tiny"]
    out = tmp_path / "out"
    train(f"mllm={t['mllm']}", f"alignnet={t['alignnet_safetensors']}", f"flux={t['flux']}",
          f"flux_transformer={t['comfy_flux']}", f"output_dir={out}", f"data.path={data}", "data.resolution=32",
          "train.steps=1", "checkpoint.every=0", "lightcontrol.num_modules=19")
    import shutil

    shutil.copy(out / "lightcontrol.safetensors", os.path.join(host["base"], "models", "x2i", "trained-lc.safetensors"))
    entry = host["server"].run(tiny_api(host, "x2i_edit_lightcontrol.json",
                                        X2ILightControlLoader={"lightcontrol_name": "trained-lc.safetensors"}))
    assert execution_error(entry) is None, execution_error(entry)


def test_lightcontrol_config_parses():
    from x2i_core.train.lightcontrol_trainer import LightControlTrainingConfig
    from x2i_core.train.runtime import load_config

    cfg = load_config(LightControlTrainingConfig, os.path.join(ROOT, "configs", "lightcontrol-80gb.yaml"))
    assert cfg["lightcontrol"]["num_modules"] == 19 and cfg["train"]["lr"] == 1e-5


@pytest.mark.slow  # loads the tiny MLLM, VAE and FLUX: ~20 s on 2 cores
def test_an_alignnet_that_does_not_fit_the_flux_is_refused_before_training(tiny, tmp_path):
    """Both FLUX trainers check the AlignNet's output widths against the transformer once it is loaded
    (an X2IShapeError naming both), instead of failing inside FLUX's first forward."""
    from x2i_core.errors import X2IShapeError
    from x2i_core.tiny import build_alignnet
    from x2i_core.train.lightcontrol_trainer import LightControlTrainer, LightControlTrainingConfig
    from x2i_core.train.runtime import load_config

    narrow = tmp_path / "narrow.safetensors"
    build_alignnet(channels=3, hidden=64, output_dim1=128).save(str(narrow))
    cfg = load_config(LightControlTrainingConfig, None, [
        f"mllm={tiny['mllm']}", f"alignnet={narrow}", f"flux={tiny['flux']}", "data.resolution=32",
        f"data.path={make_triples(str(tmp_path / 'data'))}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(X2IShapeError, match=r"outputs token/pooled widths 128/768, but the FLUX transformer "
                                            r"expects 4096/768"):
        LightControlTrainer(cfg)
