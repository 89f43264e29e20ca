"""The distillation trainer end to end on tiny models: learning, exact resume after SIGKILL, DDP, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.datasets import CAPTIONS, write_tar_shard
from helpers.trainers import distill_args, run_cli
from x2i_core.train.data import CaptionStream
from x2i_core.train.runtime import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    d = tmp_path_factory.mktemp("captions")
    (d / "caps.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return str(d / "caps.txt")


base_args = distill_args


def distill(*args, env=None, timeout=600, check=True):
    return run_cli(*args, env=env, timeout=timeout, check=check)


def losses(out):
    return [(int(r["step"]), r["loss"]) for r in read_metrics(out)]


@pytest.mark.slow
def test_200_steps_cut_the_summed_kl_tenfold(tiny, captions, tmp_path):
    out = tmp_path / "run"
    distill(*base_args(tiny, captions, out, "train.steps=200", "checkpoint.every=100"))
    rows = read_metrics(out)
    assert len(rows) == 200 and all(int(r["pairs"]) == 3 for r in rows)  # 1 double block x2 + 1 single block
    first = float(rows[0]["loss"])
    last = sum(float(r["loss"]) for r in rows[-10:]) / 10
    print(f"summed KL: first {first:.4g}, mean of last 10 {last:.4g}, ratio {first / last:.1f}x")
    assert first / last >= 10
    from x2i_core.alignnet import load_alignnet

    net = load_alignnet(out / "alignnet.safetensors")
    assert (net.config.in_channels, net.config.input_dim) == (3, 64)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume_continues_identically(tiny, captions, tmp_path):
    common = ("train.steps=12", "checkpoint.every=4", "checkpoint.keep_last=2")
    ref = tmp_path / "ref"
    distill(*base_args(tiny, captions, ref, *common))
    out = tmp_path / "killed"
    r = distill(*base_args(tiny, captions, out, *common), env={"X2I_TEST_CRASH": "checkpoint:8"}, check=False)
    assert r.returncode == -signal.SIGKILL
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert "step-00000004" in ckpts and "step-00000008" not in ckpts  # the half-written one is not a checkpoint
    distill(*base_args(tiny, captions, out, *common))
    assert losses(out) == losses(ref)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000008", "step-00000012"]  # keep_last=2, no temp left
    from safetensors.torch import load_file

    a, b = load_file(out / "alignnet.safetensors"), load_file(ref / "alignnet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise equal weights


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_continues_identically(tiny, tmp_path):
    # over-long captions are skipped (data.skip_long): the resumed stream must skip exactly the same ones
    caps = tmp_path / "caps.txt"
    lines = list(CAPTIONS)
    lines.insert(2, "word " * 600)
    caps.write_text("\n".join(lines) + "\n", encoding="utf-8")
    captions = str(caps)
    common = ("train.steps=14", "checkpoint.every=3", "data.skip_long=true")
    ref = tmp_path / "ref"
    distill(*base_args(tiny, captions, ref, *common))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "x2i_core", *base_args(tiny, captions, out, *common)],
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.csv").exists() and len(read_metrics(out)) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(out)) < 14
    distill(*base_args(tiny, captions, out, *common))
    assert losses(out) == losses(ref)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tiny, captions, tmp_path):
    # A small lr: Adam's first steps are ~lr * sign(grad), which magnifies round-off in near-zero gradients.
    common = ("train.steps=4", "checkpoint.every=0", "train.lr=1e-5")
    one = tmp_path / "one"
    distill(*base_args(tiny, captions, one, *common))
    two = tmp_path / "two"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "x2i_core",
                        *base_args(tiny, captions, two, *common)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    l1 = [float(v) for _, v in losses(one)]
    l2 = [float(v) for _, v in losses(two)]
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (l1, l2)
    from safetensors.torch import load_file

    w1, w2 = load_file(one / "alignnet.safetensors"), load_file(two / "alignnet.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-6, rtol=1e-4), (k, (w1[k] - w2[k]).abs().max())


@pytest.mark.slow
def test_teacher_embedding_cache_gives_the_same_losses(tiny, captions, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    distill(*base_args(tiny, captions, plain, "train.steps=3", "checkpoint.every=0"))
    distill(*base_args(tiny, captions, cached, "train.steps=3", "checkpoint.every=0",
                       "distill.cache_teacher_embeddings=true"))
    assert len(os.listdir(cached / "teacher_cache")) == 6
    for (_, a), (_, b) in zip(losses(plain), losses(cached)):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(a)))


@pytest.mark.parametrize("case", ["empty", "long", "mismatch", "unwritable", "unknown_key", "no_teacher"])
def test_bad_input_fails_clearly_before_any_step(tiny, captions, tmp_path, case):
    out = tmp_path / "out"
    extra, flux, data = [], "flux_small", captions
    if case == "empty":
        (tmp_path / "empty.txt").write_text("\n\n")
        data, needle = str(tmp_path / "empty.txt"), "has no captions"
    elif case == "long":
        (tmp_path / "long.txt").write_text("word " * 600 + "\n")
        data, needle = str(tmp_path / "long.txt"), "data.skip_long"
    elif case == "mismatch":
        from x2i_core.tiny import build_alignnet

        build_alignnet(channels=29, hidden=64, seed=1, output_dim0=32, output_dim1=64).save(tmp_path / "a.safetensors")
        extra, needle = [f"alignnet.init={tmp_path / 'a.safetensors'}"], "C=29"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out, needle = tmp_path / "file" / "out", "cannot be created"
    elif case == "unknown_key":
        extra, needle = ["train.learning_rate=1"], "unknown"
    else:
        flux, needle = "flux", None
        shutil.copytree(tiny["flux"], tmp_path / "flux")
        shutil.rmtree(tmp_path / "flux" / "text_encoder_2")
        import json

        idx = json.loads((tmp_path / "flux" / "model_index.json").read_text())
        idx["text_encoder_2"] = [None, None]
        idx["tokenizer_2"] = [None, None]
        (tmp_path / "flux" / "model_index.json").write_text(json.dumps(idx))
        tiny = dict(tiny, flux=str(tmp_path / "flux"))
        needle = "teacher"
    args = base_args(tiny, data, out, "train.steps=3", *extra, flux=flux)
    r = distill(*args, check=False, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (out / "metrics.csv").exists() and not (out / "checkpoints").exists()


def test_caption_sources_txt_jsonl_and_tar_shards(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"caption": "three"}\n{"caption_en": "four"}\n{"other": 1}\n')
    write_tar_shard(str(tmp_path / "c.tar"), ["five", "six"])
    s = CaptionStream([str(tmp_path)], shuffle=False)
    assert s.head(10) == ["one", "two", "three", "four", "five", "six"]
    it = s.iterate_from(5)
    assert [next(it) for _ in range(3)] == ["six", "one", "two"]  # wraps into the next epoch
    shuffled = CaptionStream([str(tmp_path)], seed=3)
    assert sorted(shuffled.head(6)) == sorted(s.head(6))


def test_shipped_configs_parse():
    from x2i_core.train.distill import DistillTrainingConfig
    from x2i_core.train.runtime import load_config

    folder = os.path.join(ROOT, "configs")
    names = sorted(f for f in os.listdir(folder) if f.startswith("distill-"))
    assert len(names) >= 3
    for name in names:
        cfg = load_config(DistillTrainingConfig, os.path.join(folder, name))
        assert cfg["distill"]["temperature"] == 3.0 and cfg["preset"] == "training"


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_distill.py"), "--rows", "64",
                        "--width", "128", "--repeat", "1", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "b.json").read_text())
    assert report["two_vs_one_flux_weight_ratio"] == 2.0
    assert report["rowwise_memory_ratio_vs_eager"] < 1.0
    ck = report["checkpointing"]  # the real trainer step with and without gradient checkpointing
    assert ck["held_ratio_on_vs_off"] < 0.5 and ck["loss_rel_diff"] <= 1e-5 and ck["grad_rel_diff"] <= 1e-5


@pytest.mark.slow  # four trainers, two steps each: ~25 s on 2 cores
@pytest.mark.parametrize("backend", ["rowwise", "reference"])
def test_gradient_checkpointing_gives_the_same_first_step(tiny, captions, tmp_path, backend):
    # Under activation checkpointing FLUX's blocks run again in backward, with the loss hooks inside them.
    from x2i_core.train.distill import DistillTrainer, DistillTrainingConfig
    from x2i_core.train.runtime import load_config

    results = {}
    for ckpt in (False, True):
        args = base_args(tiny, captions, tmp_path / f"ckpt-{ckpt}", "train.max_grad_norm=1e9",
                         f"train.gradient_checkpointing={str(ckpt).lower()}", f"distill.loss_backend={backend}")[1:]
        trainer = DistillTrainer(load_config(DistillTrainingConfig, None, args))
        try:
            assert trainer.flux.is_gradient_checkpointing is ckpt
            info = trainer.step(0, CAPTIONS[:2])
            grads = {n: p.grad.detach().clone() for n, p in trainer.net.named_parameters()}
            again = trainer.step(1, CAPTIONS[2:4])  # the hooks and the teacher store are clean after a step
        finally:
            trainer.close()
        results[ckpt] = (info, grads, again)
    (i0, g0, a0), (i1, g1, a1) = results[False], results[True]
    assert i0["pairs"] == i1["pairs"] == 3
    assert abs(i0["loss"] - i1["loss"]) <= 1e-5 * abs(i0["loss"])
    assert abs(a0["loss"] - a1["loss"]) <= 1e-5 * abs(a0["loss"])
    worst = 0.0
    for name, g in g0.items():
        rel = float((g1[name] - g).norm() / g.norm().clamp_min(1e-30))
        worst = max(worst, rel)
        assert rel <= 1e-5, (name, rel)
    print(f"{backend}: loss {i0['loss']:.6g} vs {i1['loss']:.6g}, worst relative gradient difference {worst:.2e}")
