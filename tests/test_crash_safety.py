"""Crash-safe training: kill-and-resume at random points of each trainer, and damaged checkpoints.

Every trainer (distillation, LightControl, LoRA) is killed 20 times at seeded random points - mid-step and
at every phase of a checkpoint write (``X2I_TEST_CRASH``, see ``x2i_core.train.checkpoints._test_crash``),
including a "torn" checkpoint whose file the disk lost after the rename - and resumed each time; the last
resume must end with weights bitwise equal to one uninterrupted run.  Damaged newest checkpoints (cut,
flipped, missing files, a broken manifest, legacy folders without a manifest) must be reported and the
previous one used.

Starting torch + diffusers costs seconds per process, so the killed runs are forks of one prepared Python
(``ForkServer``: the file run as a script); the uninterrupted references run as ordinary ``python -m
x2i_core`` processes through the helpers of the trainers' own test modules, so the two paths are compared.
"""

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.datasets import CAPTIONS, edit_triples, lora_dataset
from helpers.trainers import distill_args, lightcontrol_args, lora_args, run_cli
from x2i_core.train.runtime import CheckpointManager, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24     # per run; every step is checkpointed
KILLS = 20
WINDOW = 2     # a kill lands in one of the next WINDOW steps after the checkpoint a run resumes from
COMMON = (f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep_last=2")
# One thread everywhere: bitwise equality needs the same thread count in the reference and the resumed runs,
# and on a shared machine OpenMP's spinning threads make two threads ~20x slower than one.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WEIGHTS = {"distill": "alignnet.safetensors", "lightcontrol": "lightcontrol.safetensors", "lora": "lora.safetensors"}


# -- the fork server ----------------------------------------------------------------------------------
def _serve() -> None:
    """Import the heavy libraries once, then fork one child per request line (JSON: argv, env, log,
    timeout); the child runs the CLI with stdout/stderr in ``log``; the reply is its exit code
    (negative: the signal that ended it, as ``subprocess`` reports it)."""
    import diffusers  # noqa: F401 - imported here so that the children start warm
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import FluxPipeline  # noqa: F401

    import x2i_core.cli
    import x2i_core.mllm  # noqa: F401
    import x2i_core.train.distill  # noqa: F401
    import x2i_core.train.lightcontrol_trainer  # noqa: F401
    import x2i_core.train.lora  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 99
            try:
                os.environ.update(req["env"])
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                signal.alarm(int(req["timeout"]))  # a hung child dies (SIGALRM) instead of hanging the test
                rc = x2i_core.cli.main(req["argv"])
            except BaseException:  # noqa: BLE001 - report whatever happened in the log, then exit
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class ForkServer:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.dirname(__file__), **THREADS)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert self._reply(120) == "ready"

    def _reply(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the fork server gave no answer in {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"the fork server ended (rc {self.proc.poll()})"
        return line.strip()

    def run(self, argv, log, env=None, timeout=300) -> int:
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "env": env or {}, "log": str(log),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._reply(timeout + 30))["rc"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


# -- the three trainers on tiny models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def setups(tiny, tmp_path_factory):
    """name -> (argv builder for an output folder, reference output folder of one uninterrupted run)."""
    d = tmp_path_factory.mktemp("crash-data")
    (d / "caps.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    triples = edit_triples(str(d / "triples"))
    images = lora_dataset(str(d / "images"))
    argv = {
        "distill": lambda out, *x: distill_args(tiny, str(d / "caps.txt"), out, *COMMON, *x),
        "lightcontrol": lambda out, *x: ["train-lightcontrol", *lightcontrol_args(tiny, triples, out, *COMMON, *x)],
        "lora": lambda out, *x: ["train-lora", *lora_args(tiny, images, out, *COMMON, *x)],
    }
    return {"argv": argv, "root": d, "refs": {}}


def reference(setups, name):
    """One uninterrupted run as an ordinary process (through the CLI, as the trainers' tests run it), made once
    per module."""
    refs = setups["refs"]
    if name not in refs:
        out = setups["root"] / f"ref-{name}"
        t0 = time.time()
        run_cli(*setups["argv"][name](out), env=THREADS)
        print(f"reference {name}: {time.time() - t0:.1f} s")
        refs[name] = out
    return refs[name]


def losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out)]


def assert_same_result(out, ref, name):
    from safetensors.torch import load_file

    assert losses(out) == losses(ref)
    a, b = load_file(os.path.join(out, WEIGHTS[name])), load_file(os.path.join(ref, WEIGHTS[name]))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise


def usable_steps(out):
    ckpt = CheckpointManager(str(out), keep_last=2)
    return [s for s in ckpt.steps() if ckpt.usable(s)]


def tail(log, n=3000):
    with open(log, encoding="utf-8", errors="replace") as fh:
        return fh.read()[-n:]


# -- 20 kills at random points, resumed each time ----------------------------------------------------------
PHASES = ("begin", "written", "manifest", "renamed", "torn", "pruning")


def kill_points(resumed: int) -> list[tuple[str, int]]:
    """(X2I_TEST_CRASH value, the step the next run must resume from) for the next WINDOW steps."""
    points = []
    for n in range(resumed + 1, min(STEPS, resumed + WINDOW) + 1):
        points.append((f"step:{n}", n - 1))  # mid-step: updated in memory, not yet checkpointed
        for phase in PHASES:
            if phase == "torn" and n == 1:
                continue  # a lost first checkpoint leaves nothing usable (that case is its own test)
            points.append((f"checkpoint:{n}:{phase}", n if phase in ("renamed", "pruning") else n - 1))
    return points


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distill", "lightcontrol", "lora"])
def test_twenty_kills_at_random_points_then_resume_reach_the_uninterrupted_weights(setups, server, tmp_path, name):
    ref = reference(setups, name)
    rng = random.Random(f"x2i-crash-chain-{name}")
    out = tmp_path / "chain"
    argv = setups["argv"][name](out)
    resumed, torn, history = 0, None, []
    t0 = time.time()
    for trial in range(KILLS):
        point, then = rng.choice(kill_points(resumed))
        log = tmp_path / f"run-{trial:02d}.log"
        rc = server.run(argv, log, env={"X2I_TEST_CRASH": point})
        history.append(point)
        assert rc == -signal.SIGKILL, (history, rc, tail(log))
        if torn is not None:  # this run started after a torn checkpoint: it must have said so, and skipped it
            assert f"checkpoint {out / 'checkpoints' / f'step-{torn:08d}'} is unusable" in tail(log, 10**6), history
        torn = int(point.split(":")[1]) if point.endswith(":torn") else None
        resumed = then
        usable = usable_steps(out)
        assert (usable[-1] if usable else 0) == resumed, (history, usable)
        assert len(usable) <= 3  # keep_last=2, plus the newest when the kill came before pruning
        present = CheckpointManager(str(out)).steps()
        damaged = [s for s in present if s not in usable]  # only a torn one, newer than every usable one
        assert len(damaged) <= 1 and all(s > resumed for s in damaged), (history, present, usable)
    log = tmp_path / "final.log"
    rc = server.run(argv, log)
    assert rc == 0, tail(log)
    chain_s = time.time() - t0
    print(f"{name}: {KILLS} kills at {history}; chain {chain_s:.1f} s")
    assert_same_result(out, ref, name)
    assert usable_steps(out) == [STEPS - 1, STEPS]  # keep_last=2 of valid ones, no damaged one left
    assert sorted(os.listdir(out / "checkpoints")) == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]


# -- damaged checkpoints -----------------------------------------------------------------------------------
def _damage(folder, kind):
    state = os.path.join(folder, "trainer_state.pt")
    weights = os.path.join(folder, "alignnet.safetensors")
    if kind == "truncate":
        with open(weights, "r+b") as fh:
            fh.truncate(os.path.getsize(weights) - 100)
        return "is truncated or overwritten"
    if kind == "flip":  # same size, a byte of tensor data changed: only the checksum can tell
        with open(weights, "r+b") as fh:
            fh.seek(os.path.getsize(weights) - 17)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([b[0] ^ 0x5A]))
        return "is corrupt: expected sha256"
    if kind == "missing_file":
        os.remove(state)
        return "is missing"
    if kind == "bad_manifest":
        with open(os.path.join(folder, "manifest.json"), "w") as fh:
            fh.write('{"format": "x2i-checkp')
        return "cannot be read"
    if kind == "legacy_unreadable":  # an older version's folder (no manifest) whose state file is cut short
        for step_dir in os.listdir(os.path.dirname(folder)):
            os.remove(os.path.join(os.path.dirname(folder), step_dir, "manifest.json"))
        with open(state, "r+b") as fh:
            fh.truncate(os.path.getsize(state) // 2)
        return "cannot be read"
    raise AssertionError(kind)


@pytest.mark.slow  # with the reference run and a killed run per case: ~30 s on 2 cores
@pytest.mark.parametrize("kind", ["truncate", "flip", "missing_file", "bad_manifest", "legacy_unreadable"])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(setups, server, tmp_path, kind):
    ref = reference(setups, "distill")
    out = tmp_path / "out"
    argv = setups["argv"]["distill"](out)
    assert server.run(argv, tmp_path / "killed.log", env={"X2I_TEST_CRASH": "step:9"}) == -signal.SIGKILL
    assert usable_steps(out) == [7, 8]
    newest = out / "checkpoints" / "step-00000008"
    needle = _damage(newest, kind)
    log = tmp_path / "resumed.log"
    assert server.run(argv, log) == 0, tail(log)
    text = tail(log, 10**6)
    assert f"checkpoint {newest} is unusable" in text and needle in text, text[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-00000007'} (step 7)" in text, text[-3000:]
    assert_same_result(out, ref, "distill")


@pytest.mark.slow
def test_legacy_checkpoints_without_a_manifest_still_resume(setups, server, tmp_path):
    ref = reference(setups, "lora")
    out = tmp_path / "out"
    argv = setups["argv"]["lora"](out)
    assert server.run(argv, tmp_path / "killed.log", env={"X2I_TEST_CRASH": "step:6"}) == -signal.SIGKILL
    for step in (4, 5):  # as an earlier version wrote them
        os.remove(out / "checkpoints" / f"step-{step:08d}" / "manifest.json")
    log = tmp_path / "resumed.log"
    assert server.run(argv, log) == 0, tail(log)
    text = tail(log, 10**6)
    assert f"checkpoint {out / 'checkpoints' / 'step-00000005'} has no manifest.json" in text, text[-3000:]
    assert "unusable" not in text
    assert_same_result(out, ref, "lora")


@pytest.mark.slow  # a killed training run (and the module's kill server and set-ups)
def test_no_usable_checkpoint_is_a_clear_error_and_deletes_nothing(setups, server, tmp_path):
    out = tmp_path / "out"
    argv = setups["argv"]["lightcontrol"](out)
    assert server.run(argv, tmp_path / "killed.log", env={"X2I_TEST_CRASH": "step:3"}) == -signal.SIGKILL
    folders = sorted(os.listdir(out / "checkpoints"))
    assert folders == ["step-00000001", "step-00000002"]
    for name in folders:
        with open(out / "checkpoints" / name / "trainer_state.pt", "ab") as fh:
            fh.write(b"junk")
    log = tmp_path / "resumed.log"
    assert server.run(argv, log) == 1
    text = tail(log, 10**6)
    assert f"error: no usable checkpoint in {out / 'checkpoints'}" in text, text[-3000:]
    assert "step-00000001: checkpoint file" in text and "step-00000002: checkpoint file" in text
    assert "Traceback" not in text
    assert sorted(os.listdir(out / "checkpoints")) == folders
    # starting over on purpose works, and replaces the damaged folders
    assert server.run([*argv, "checkpoint.resume=never", "train.steps=2"], log) == 0, tail(log)
    assert usable_steps(out) == [1, 2]


# -- the checkpoint manager on its own ------------------------------------------------------------------------
def _write(step, payload=b""):
    def writer(folder):
        with open(os.path.join(folder, "weights.bin"), "wb") as fh:
            fh.write(bytes(range(256)) * 8 + payload)
        os.makedirs(os.path.join(folder, "sub"))
        with open(os.path.join(folder, "sub", "state.json"), "w") as fh:
            json.dump({"step": step}, fh)
    return writer


def test_manifest_lists_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    ckpt = CheckpointManager(str(tmp_path), keep_last=3)
    folder = ckpt.save(3, _write(3))
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    assert manifest["step"] == 3 and sorted(manifest["files"]) == ["sub/state.json", "weights.bin"]
    for rel, entry in manifest["files"].items():
        data = open(os.path.join(folder, rel), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(3) == "verified"
    assert os.listdir(ckpt.root) == ["step-00000003"]  # no temporary folder left


@pytest.mark.parametrize("kind", ["truncate", "flip", "missing", "manifest_step", "manifest_json"])
def test_verify_names_the_file_the_expected_and_the_found(tmp_path, kind):
    from x2i_core.train.runtime import X2ICheckpointError

    ckpt = CheckpointManager(str(tmp_path))
    folder = ckpt.save(5, _write(5))
    w = os.path.join(folder, "weights.bin")
    if kind == "truncate":
        with open(w, "r+b") as fh:
            fh.truncate(1000)
        expect = [w, "expected 2048 bytes", "found 1000 bytes"]
    elif kind == "flip":
        data = bytearray(open(w, "rb").read())
        data[77] ^= 1
        open(w, "wb").write(bytes(data))
        import hashlib

        expect = [w, "expected sha256", "found " + hashlib.sha256(bytes(data)).hexdigest()]
    elif kind == "missing":
        os.remove(os.path.join(folder, "sub", "state.json"))
        expect = [os.path.join(folder, "sub", "state.json"), "is missing", "found no file"]
    elif kind == "manifest_step":
        m = json.loads(open(os.path.join(folder, "manifest.json")).read())
        m["step"] = 4
        open(os.path.join(folder, "manifest.json"), "w").write(json.dumps(m))
        expect = ["manifest.json", "names step 4", "expected 5"]
    else:
        open(os.path.join(folder, "manifest.json"), "w").write("{not json")
        expect = ["manifest.json", "cannot be read", "JSONDecodeError"]
    fresh = CheckpointManager(str(tmp_path))  # nothing cached: a new process resuming
    with pytest.raises(X2ICheckpointError) as info:
        fresh.verify(5)
    for needle in expect:
        assert needle in str(info.value), (needle, str(info.value))
    with pytest.raises(X2ICheckpointError):
        ckpt.verify(5)  # the writer's cache does not hide a change either


def test_pruning_counts_only_usable_checkpoints(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=2)
    for s in (1, 2):
        ckpt.save(s, _write(s))
    with open(os.path.join(ckpt.path(2), "weights.bin"), "r+b") as fh:  # step 2 is damaged after the fact
        fh.write(b"\xff")
    ckpt.save(3, _write(3))
    # a count of folders would keep 2 and 3 and delete the good step 1
    assert ckpt.steps() == [1, 3]
    legacy = ckpt.path(0)
    os.makedirs(legacy)
    open(os.path.join(legacy, "weights.bin"), "wb").write(b"old")
    ckpt.save(4, _write(4))
    assert ckpt.steps() == [3, 4]
    assert not [n for n in os.listdir(ckpt.root) if n.startswith(".tmp")]


def test_resume_falls_back_logs_and_raises_when_nothing_is_usable(tmp_path, caplog):
    from x2i_core.errors import X2IFileError
    from x2i_core.train.runtime import X2ICheckpointError

    ckpt = CheckpointManager(str(tmp_path), keep_last=5)
    assert ckpt.resume(lambda folder: 1 / 0) is None  # no checkpoints: a fresh start, load never called
    for s in (1, 2, 3):
        ckpt.save(s, _write(s))
    os.remove(os.path.join(ckpt.path(3), "weights.bin"))
    os.remove(os.path.join(ckpt.path(2), "manifest.json"))  # legacy, and its load fails

    def load(folder):
        if folder == ckpt.path(2):
            raise X2IFileError(f"checkpoint state '{folder}/trainer_state.pt' cannot be read (bad zip)")
        return int(folder[-8:])

    with caplog.at_level("WARNING", logger="x2i"):
        assert CheckpointManager(str(tmp_path)).resume(load) == 1
    text = caplog.text
    assert f"checkpoint {ckpt.path(3)} is unusable" in text and "is missing" in text
    assert f"checkpoint {ckpt.path(2)} is unusable" in text and "bad zip" in text
    assert f"resuming from {ckpt.path(1)} (step 1)" in text
    assert ckpt.steps() == [1, 2, 3]  # resuming deletes nothing

    with pytest.raises(X2ICheckpointError, match="trainer state says step 7, expected 1"):
        CheckpointManager(str(tmp_path)).resume(lambda folder: 7 if folder == ckpt.path(1) else load(folder))
    shutil.rmtree(ckpt.path(1))
    with pytest.raises(X2ICheckpointError, match="no usable checkpoint") as info:
        CheckpointManager(str(tmp_path)).resume(load)
    assert "step-00000003" in str(info.value) and "step-00000002" in str(info.value)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
