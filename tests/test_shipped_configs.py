"""Every file in configs/ trains end to end through its real CLI entry point on the tiny models.

Only what a laptop without a big GPU must change is overridden, and each override is listed in OVERRIDES
below with its kind (paths, sizes, step counts, CUDA-only options): the rest of the file - gradient
checkpointing, mixed precision, schedules, caching, logging - runs as shipped.  Each config trains two
steps with a checkpoint after each, then a second invocation resumes from the step-2 checkpoint and trains
a third step.  So a shipped config can no longer break while the suite stays green.
"""

import os
import subprocess
import sys

import pytest
import yaml

from helpers.datasets import caption_file, edit_triples, lora_dataset
from x2i_core.train.runtime import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.configs]  # every shipped config through the CLI, with a resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
COMMANDS = {"distill": "distill", "lora": "train-lora", "lightcontrol": "train-lightcontrol"}
WEIGHTS = {"distill": "alignnet.safetensors", "train-lora": "lora.safetensors",
           "train-lightcontrol": "lightcontrol.safetensors"}
STEPS = ["train.steps=2", "checkpoint.every=1"]  # step counts (the resume run asks for 3)
CUDA_ONLY = ["train.optimizer=adamw"]  # adamw8bit needs bitsandbytes on CUDA


def overrides(command, tiny, data, out):
    """The overrides of one config, by kind."""
    if command == "distill":
        paths = [f"mllm={tiny['mllm']}", f"flux={tiny['flux_small']}", f"data.paths=[{data}]"]
        sizes = ["distill.resolution=64", "train.batch_size=2"]
    elif command == "train-lora":
        paths = [f"mllm={tiny['mllm']}", f"alignnet={tiny['alignnet_safetensors']}", f"flux={tiny['flux']}",
                 f"data.path={data}"]
        sizes = ["data.resolution=64", "data.bucket_step=16"]
    else:
        paths = [f"mllm={tiny['mllm']}", f"alignnet={tiny['alignnet_safetensors']}", f"flux={tiny['flux']}",
                 f"data.path={data}"]
        sizes = ["data.resolution=64", "lightcontrol.num_modules=1"]  # the tiny FLUX has one double block
    return [*paths, f"output_dir={out}", *sizes, *STEPS, *CUDA_ONLY]


def shipped():
    names = sorted(f for f in os.listdir(CONFIGS) if f.endswith((".yaml", ".yml")))
    assert names, "configs/ is empty"
    return names


def command_of(name):
    for prefix, command in COMMANDS.items():
        if name.startswith(prefix + "-"):
            return command
    raise AssertionError(f"configs/{name}: no trainer for its prefix (known: {sorted(COMMANDS)}); add it here")


def launcher(name):
    """distill-multigpu runs on two processes (gloo), as torchrun would start it on two GPUs."""
    if "multigpu" in name:
        return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2"]
    return [sys.executable]


def run(name, args):
    cmd = [*launcher(name), "-m", "x2i_core", "-v", command_of(name), "--config", os.path.join(CONFIGS, name), *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{name}: {' '.join(args)}\n{r.stderr[-4000:]}"
    return r


def test_every_config_has_a_trainer_and_loads():
    from x2i_core.train.distill import DistillTrainingConfig as DISTILL
    from x2i_core.train.lightcontrol_trainer import LightControlTrainingConfig as LIGHTCONTROL
    from x2i_core.train.lora import LoraTrainingConfig as LORA
    from x2i_core.train.runtime import load_config

    defaults = {"distill": DISTILL, "train-lora": LORA, "train-lightcontrol": LIGHTCONTROL}
    for name in shipped():
        load_config(defaults[command_of(name)], os.path.join(CONFIGS, name))


@pytest.mark.parametrize("name", shipped())
def test_shipped_config_trains_checkpoints_and_resumes(tiny, tmp_path, name):
    command = command_of(name)
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as fh:
        shipped_cfg = yaml.safe_load(fh)
    if command == "distill":
        data = caption_file(tmp_path / "captions.txt")
    elif command == "train-lora":
        data = lora_dataset(str(tmp_path / "data"))
    else:
        data = edit_triples(str(tmp_path / "data"))
    out = tmp_path / "run"
    args = overrides(command, tiny, data, out)
    print(f"{name} ({command}) overrides: {' '.join(a for a in args if not a.startswith(('mllm=', 'alignnet=')))}")
    run(name, args)
    first = read_metrics(out)
    assert [int(r["step"]) for r in first] == [1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001", "step-00000002"]
    assert (out / WEIGHTS[command]).is_file()

    again = run(name, [a for a in args if a != "train.steps=2"] + ["train.steps=3"])
    assert "resuming from" in again.stderr and "step 2" in again.stderr, again.stderr[-3000:]
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert rows[:2] == first
    assert "step-00000003" in os.listdir(out / "checkpoints")
    if shipped_cfg.get("train", {}).get("gradient_checkpointing"):
        print(f"{name}: trained with gradient checkpointing on")
