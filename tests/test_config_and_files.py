"""Trainer config values accept the spellings their messages promise; written files get plain modes."""

import os
import re
import stat
import subprocess
import sys

import pytest

from helpers.datasets import caption_file
from x2i_core.errors import X2IInputError
from x2i_core.train.runtime import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def defaults():
    from x2i_core.train.distill import DistillTrainingConfig

    return DistillTrainingConfig


@pytest.mark.parametrize("spelling,want", [
    ("no", "no"), ("false", "no"), ("none", "no"), ("off", "no"), ("null", "no"), ('"no"', "no"), ("No", "no"),
    ("fp32", "no"), ("bf16", "bf16"), ("BF16", "bf16"), ("fp16", "fp16")])
def test_mixed_precision_spellings_on_the_command_line(spelling, want):
    assert load_config(defaults(), None, [f"train.mixed_precision={spelling}"])["train"]["mixed_precision"] == want


def test_off_spellings_in_a_yaml_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {mixed_precision: no, gradient_checkpointing: off}\ncheckpoint: {resume: false}\n"
                   "alignnet: {init: none}\ndata: {caption_key: ~}\n")
    c = load_config(defaults(), str(cfg))
    assert c["train"]["mixed_precision"] == "no" and c["train"]["gradient_checkpointing"] is False
    assert c["checkpoint"]["resume"] == "never" and c["alignnet"]["init"] is None and c["data"]["caption_key"] is None


@pytest.mark.parametrize("spelling,want", [("true", True), ("yes", True), ("on", True), ("1", True),
                                           ("false", False), ("no", False), ("off", False), ("none", False),
                                           ("0", False)])
def test_boolean_spellings(spelling, want):
    assert load_config(defaults(), None, [f"train.gradient_checkpointing={spelling}"])["train"][
        "gradient_checkpointing"] is want


@pytest.mark.parametrize("key,bad", [("train.mixed_precision", "fp8"), ("checkpoint.resume", "sometimes"),
                                     ("train.gradient_checkpointing", "maybe")])
def test_every_spelling_an_error_lists_is_accepted(key, bad):
    with pytest.raises(X2IInputError) as info:
        load_config(defaults(), None, [f"{key}={bad}"])
    message = str(info.value)
    assert message.startswith(f"{key} {bad!r}: expected")
    listed = re.findall(r"[a-z0-9]+", message.split("expected", 1)[1].replace("one of", ""))
    listed = [w for w in listed if w not in ("or", "also")]
    assert len(listed) >= 3, message
    for word in listed:
        load_config(defaults(), None, [f"{key}={word}"])  # raises if the message promised a spelling that fails


def test_atomic_writes_respect_the_umask(tmp_path):
    """Files from the atomic writer get 0666 & ~umask (as open() would), temporary folders 0777 & ~umask."""
    code = (
        "import os, sys, torch\n"
        "os.umask(int(sys.argv[2], 8))\n"
        "from x2i_core.io import atomic_save_safetensors, atomic_write_text, make_temp_dir\n"
        "d = sys.argv[1]\n"
        "atomic_save_safetensors({'w': torch.zeros(2)}, os.path.join(d, 'w.safetensors'))\n"
        "atomic_write_text(os.path.join(d, 't.txt'), 'x')\n"
        "open(os.path.join(d, 'plain.txt'), 'w').close()\n"
        "print(make_temp_dir('.tmp-x-', d))\n")
    for umask in ("022", "027", "002"):
        folder = tmp_path / umask
        folder.mkdir()
        r = subprocess.run([sys.executable, "-c", code, str(folder), umask], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        mask = int(umask, 8)
        plain = stat.S_IMODE(os.stat(folder / "plain.txt").st_mode)
        assert plain == 0o666 & ~mask
        for name in ("w.safetensors", "t.txt"):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == plain, (umask, name)
        assert stat.S_IMODE(os.stat(r.stdout.strip()).st_mode) == 0o777 & ~mask


@pytest.mark.slow
def test_trained_and_converted_files_are_readable_by_others_under_umask_022(tiny, tmp_path):
    """The distill run spells mixed precision 'no' and checkpointing 'off' on the command line."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / "run"
    run = [sys.executable, "-m", "x2i_core", "distill", f"mllm={tiny['mllm']}", f"flux={tiny['flux_small']}",
           f"output_dir={out}", f"data.paths=[{caption_file(tmp_path / 'caps.txt')}]", "distill.resolution=32",
           "train.steps=1", "checkpoint.every=1", "train.mixed_precision=no", "train.gradient_checkpointing=off"]
    conv = [sys.executable, "-m", "x2i_core", "convert-alignnet", tiny["alignnet"], str(tmp_path / "conv.safetensors")]
    gen = [sys.executable, "-m", "x2i_core", "generate", "--mllm", tiny["mllm"], "--alignnet",
           tiny["alignnet_safetensors"], "--flux", tiny["flux"], "--prompt", "a fox", "--steps", "1", "--size",
           "32x32", "--out", str(tmp_path / "img.png")]
    for cmd in (run, conv, gen):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT, umask=0o022)
        assert r.returncode == 0, r.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-00000001"
    for path in (out / "alignnet.safetensors", out / "config.json", ckpt / "alignnet.safetensors",
                 ckpt / "meta.json", tmp_path / "conv.safetensors", tmp_path / "img.png"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert stat.S_IMODE(os.stat(ckpt).st_mode) == 0o755


def test_an_unknown_loss_backend_is_refused_before_any_model_loads(tmp_path):
    from x2i_core.train.distill import DistillTrainer, DistillTrainingConfig

    cfg = load_config(DistillTrainingConfig, None, [
        "mllm=/nonexistent", "flux=/nonexistent", f"output_dir={tmp_path / 'o'}",
        "data.paths=[x.txt]", "distill.loss_backend=fast"])
    with pytest.raises(X2IInputError, match="distill.loss_backend 'fast': expected auto, fused, rowwise or reference"):
        DistillTrainer(cfg)


def test_configs_are_typed_dataclasses(tmp_path):
    """YAML's '1e-4' (text to YAML) reaches a float field as a float; whole numbers stay whole; a single path
    becomes a list; sections are dataclasses read by attribute (and by key, for dict-style scripts)."""
    import dataclasses

    from x2i_core.train.lora import LoraTrainingConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {lr: 1e-4, steps: '20', sigma_std: 1}\nlora: {alpha: off}\nsamples: {prompts: a fox}\n")
    cfg = load_config(LoraTrainingConfig, str(cfg_file), ["train.batch_size=2.0", "checkpoint.every=10"])
    assert dataclasses.is_dataclass(cfg) and isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-4
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int) and cfg.train.batch_size == 2
    assert isinstance(cfg.train.sigma_std, float) and cfg.lora.alpha is None and cfg.samples.prompts == ["a fox"]
    assert cfg.checkpoint.every == 10 and cfg["checkpoint"]["keep_last"] == 3  # the section's other defaults stay
    assert LoraTrainingConfig().checkpoint.every == 250  # per-trainer section defaults
    assert cfg.to_dict()["train"]["lr"] == 1e-4


@pytest.mark.parametrize("override,needle", [
    ("train.steps=2.5", "train.steps 2.5: expected a whole number"),
    ("train.lr=fast", "train.lr 'fast': expected a number"),
    ("train.steps=true", "train.steps True: expected a whole number"),
    ("preset=[a]", "preset ['a']: expected text"),
    ("train=5", "'train' is a section of settings (steps, batch_size"),
    ("train.learning_rate=1", "override key 'train.learning_rate' is unknown; known here: ['batch_size'"),
    ("lora.rank", "is not key=value"),
])
def test_bad_typed_values_name_the_key_and_what_was_expected(override, needle):
    from x2i_core.train.lora import LoraTrainingConfig

    with pytest.raises(X2IInputError) as info:
        load_config(LoraTrainingConfig, None, [override])
    assert needle in str(info.value)


def test_unknown_yaml_keys_list_the_known_ones(tmp_path):
    from x2i_core.train.lightcontrol_trainer import LightControlTrainingConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lightcontrol: {modules: 4}\n")
    with pytest.raises(X2IInputError, match=r"config key 'lightcontrol.modules' is unknown; known: \['init', "
                                            r"'num_modules'\]"):
        load_config(LightControlTrainingConfig, str(cfg_file))
