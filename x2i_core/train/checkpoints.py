"""Checkpoints: ``checkpoints/step-XXXXXXXX/`` folders written in a temporary sibling, sealed by a
``manifest.json`` of sizes and sha256s and renamed into place; resume from the newest one that verifies;
keep-last-N counting only usable ones.  The one testing hook, ``_test_crash``, kills the process at a named
point when ``X2I_TEST_CRASH`` asks for it (the kill tests)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import uuid

import torch

from ..errors import X2IFileError, X2IInputError
from ..io import make_temp_dir

log = logging.getLogger("x2i")


# -- output folder ----------------------------------------------------------------
def check_output_dir(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise X2IInputError(f"output folder '{path}' cannot be created ({exc.strerror})") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise X2IInputError(f"output folder '{path}' is not writable ({exc.strerror})") from exc
    return path


# -- checkpoints ------------------------------------------------------------------
_STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "x2i-checkpoint"


class X2ICheckpointError(X2IFileError):
    """A checkpoint folder is corrupt or unusable (its message names the file, the expected and the found)."""


def _test_crash(point: str) -> None:
    """Fault injection for the resume tests: SIGKILL this process at ``point`` when ``X2I_TEST_CRASH`` names it.

    ``step:N`` - after the optimizer update (and metrics row) of step N, before its checkpoint;
    ``checkpoint:N[:PHASE]`` - while checkpoint N is written, PHASE one of ``begin`` (temporary folder
    made, nothing in it), ``written`` (the default: every file written, no manifest yet), ``manifest``
    (manifest written and synced, not yet renamed into place), ``renamed`` (in place, older ones not
    pruned), ``torn`` (in place, then its largest file cut to half its size - a write the disk lost;
    see :meth:`CheckpointManager.save`), ``pruning`` (the first pruned folder moved out of view but not
    deleted, or after pruning when there is nothing to prune).
    """
    spec = os.environ.get("X2I_TEST_CRASH")
    if not spec:
        return
    if re.fullmatch(r"checkpoint:\d+", spec):
        spec += ":written"
    if spec == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative, ``/``-separated, sorted), the manifest excluded."""
    out = []
    for base, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    for base, _dirs, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(base)


class CheckpointManager:
    """``output/checkpoints/step-XXXXXXXX/`` with atomic, verifiable writes and keep-last-N.

    Each folder is filled under a temporary ``.tmp-*`` name; ``manifest.json`` (the size and sha256 of
    every other file) is written last, everything is fsynced, and only then is the folder renamed into
    place - so a folder named ``step-*`` is either complete or damaged *after* it was written (a lost
    write, a bad disk, a hand edit), which :meth:`verify` detects.  :meth:`resume` loads the newest
    checkpoint that verifies, falling back past damaged ones; pruning keeps the ``keep_last`` newest
    *usable* checkpoints (damaged ones are never counted, and deleted), so a damaged newer folder never
    costs a good older one.  Folders without a manifest (written before manifests existed) are *legacy*:
    they are accepted if they load, unverified.
    """

    def __init__(self, output_dir: str, keep_last: int = 3, quiet: bool = False):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = max(1, int(keep_last))
        self.quiet = quiet  # no log lines (the ranks other than 0)
        self._verified: dict[str, tuple] = {}  # folder -> (name, size, mtime_ns) of files that verified

    def steps(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.root) if (m := _STEP_DIR.match(name)))

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    # -- verification --------------------------------------------------------------
    def _signature(self, folder: str) -> tuple:
        sig = []
        for rel in [*_files(folder), MANIFEST]:
            st = os.stat(os.path.join(folder, rel))
            sig.append((rel, st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def verify(self, step: int) -> str:
        """``'verified'`` when every file matches the manifest, ``'legacy'`` for a folder without one
        (nothing to check against: :meth:`resume` verifies it by loading); raises
        :class:`X2ICheckpointError` naming the file, what the manifest expects and what was found."""
        folder = self.path(step)
        where = f"checkpoint {folder}"
        if not os.path.isdir(folder):
            raise X2ICheckpointError(f"{where} does not exist")
        mpath = os.path.join(folder, MANIFEST)
        if not os.path.exists(mpath):
            return "legacy"
        try:
            if self._verified.get(folder) == self._signature(folder):
                return "verified"
        except OSError:
            pass
        try:
            with open(mpath, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' cannot be read: expected the JSON manifest "
                                     f"written with the checkpoint, found {type(exc).__name__}: {exc}") from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
                or not all(isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values())):
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' is malformed: expected format "
                                     f"'{MANIFEST_FORMAT}' with a size and sha256 per file, found "
                                     f"{json.dumps(manifest)[:200]}")
        if manifest.get("step") != step:
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' names step {manifest.get('step')!r}, "
                                     f"expected {step} (the folder's name)")
        if not files:
            raise X2ICheckpointError(f"checkpoint manifest '{mpath}' lists no files, expected the checkpoint's "
                                     f"weights and trainer state")
        for rel, want in sorted(files.items()):
            p = os.path.join(folder, *rel.split("/"))
            if not os.path.isfile(p):
                raise X2ICheckpointError(f"checkpoint file '{p}' is missing: expected {want['size']} bytes "
                                         f"(sha256 {want['sha256'][:16]}…) as listed in {MANIFEST}, found no file")
            try:
                size = os.path.getsize(p)
                if size != want["size"]:
                    raise X2ICheckpointError(f"checkpoint file '{p}' is truncated or overwritten: expected "
                                             f"{want['size']} bytes as listed in {MANIFEST}, found {size} bytes")
                digest = _sha256(p)
            except OSError as exc:
                raise X2ICheckpointError(f"checkpoint file '{p}' cannot be read: expected {want['size']} readable "
                                         f"bytes as listed in {MANIFEST}, found {exc.strerror or exc}") from exc
            if digest != want["sha256"]:
                raise X2ICheckpointError(f"checkpoint file '{p}' is corrupt: expected sha256 {want['sha256']} "
                                         f"as listed in {MANIFEST}, found {digest} ({size} bytes, sizes agree)")
        try:
            self._verified[folder] = self._signature(folder)
        except OSError:
            pass
        return "verified"

    def usable(self, step: int) -> bool:
        """Counts for keep-last pruning: verified, or legacy (only loading could tell more)."""
        try:
            self.verify(step)
            return True
        except X2ICheckpointError:
            return False

    def resume(self, load_fn) -> int | None:
        """Restore the newest usable checkpoint: ``load_fn(folder)`` reads and applies it and returns its step.

        Folders are tried newest first.  One that fails :meth:`verify`, or whose ``load_fn`` raises
        :class:`~x2i_core.errors.X2IFileError` (a legacy folder with an unreadable file), or whose stored
        step differs from its name, is logged as a warning naming the folder and the problem, and the
        previous one is tried; nothing is deleted here.  ``load_fn`` should read every file before it
        applies any, and must fully overwrite what it restores (a later candidate replaces a failed one).

        Returns ``None`` when there is no checkpoint folder at all (a fresh start).  When folders exist
        but *none* is usable, raises :class:`X2ICheckpointError` listing each folder and its problem
        instead of silently starting over: the damage may be transient (a flaky mount) and a fresh run
        would prune the folders.  Set ``checkpoint.resume=never`` to start from scratch deliberately.
        """
        steps = self.steps()
        problems = []
        for step in reversed(steps):
            folder = self.path(step)
            try:
                kind = self.verify(step)
                loaded = int(load_fn(folder))
                if loaded != step:
                    raise X2ICheckpointError(f"checkpoint {folder}: its trainer state says step {loaded}, "
                                             f"expected {step} (the folder's name)")
            except X2IFileError as exc:
                problems.append(f"{os.path.basename(folder)}: {exc}")
                if not self.quiet:
                    log.warning("checkpoint %s is unusable, trying the previous one: %s", folder, exc)
                continue
            if not self.quiet:
                if kind == "legacy":
                    log.warning("checkpoint %s has no %s (written by an older version): it loaded, but its files "
                                "are not checksum-verified", folder, MANIFEST)
                if problems:
                    log.warning("resuming from %s (step %d) instead of the newest checkpoint step-%08d, which is "
                                "unusable", folder, step, steps[-1])
                else:
                    log.info("resuming from %s (step %d)", folder, step)
            return step
        if problems:
            raise X2ICheckpointError(
                f"no usable checkpoint in {self.root}: " + "; ".join(problems) +
                ". Move the folders away or set checkpoint.resume=never to start over (new checkpoints then "
                "replace them)")
        return None

    # -- writing ----------------------------------------------------------------------
    def save(self, step: int, writer) -> str:
        """``writer(tmp_dir)`` fills a temporary folder; the manifest follows, then the rename into place
        (a same-step folder already there is moved aside first), then keep-last pruning."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):  # leftovers of a killed write or prune
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        tmp = make_temp_dir(f".tmp-step-{step:08d}-", self.root)
        final = self.path(step)
        try:
            _test_crash(f"checkpoint:{step}:begin")
            writer(tmp)
            _test_crash(f"checkpoint:{step}:written")
            self._write_manifest(tmp, step)
            _fsync_tree(tmp)
            _test_crash(f"checkpoint:{step}:manifest")
            if os.path.exists(final):  # e.g. a damaged folder being redone: out of view, then replaced
                os.replace(final, self._aside("replaced", step))
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._verified[final] = self._signature(final)
        _test_crash(f"checkpoint:{step}:renamed")
        if os.environ.get("X2I_TEST_CRASH") == f"checkpoint:{step}:torn":
            victim = max(_files(final), key=lambda rel: (os.path.getsize(os.path.join(final, rel)), rel))
            with open(os.path.join(final, victim), "r+b") as fh:
                fh.truncate(os.path.getsize(os.path.join(final, victim)) // 2)
            _test_crash(f"checkpoint:{step}:torn")
        self.prune(keep=step, crash_point=f"checkpoint:{step}:pruning")
        return final

    def _aside(self, why: str, step: int) -> str:
        """A fresh ``.tmp-*`` name to move a folder to before deleting it (swept by the next save)."""
        return os.path.join(self.root, f".tmp-{why}-{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _write_manifest(self, folder: str, step: int) -> None:
        files = {}
        for rel in _files(folder):
            p = os.path.join(folder, *rel.split("/"))
            files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
        if not files:
            raise X2ICheckpointError(f"checkpoint {step}: the writer left no files in {folder}")
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump({"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())

    def prune(self, keep: int | None = None, crash_point: str | None = None) -> list[int]:
        """Delete all but the ``keep_last`` newest usable checkpoints (``keep``, the one just written, always
        stays); damaged folders are not counted and are deleted too.  Returns the steps deleted."""
        kept = {keep} if keep is not None else set()
        doomed = []
        for s in reversed(self.steps()):
            if s in kept:
                continue
            if len(kept) < self.keep_last and self.usable(s):
                kept.add(s)
            else:
                doomed.append(s)
        for s in doomed:
            folder = self.path(s)
            aside = self._aside("pruned", s)
            try:
                os.replace(folder, aside)  # out of view at once: never a half-deleted step-* folder
            except OSError:
                continue
            self._verified.pop(folder, None)
            if crash_point:
                _test_crash(crash_point)
                crash_point = None
            shutil.rmtree(aside, ignore_errors=True)
        if crash_point:
            _test_crash(crash_point)
        return sorted(doomed)


def save_state(path: str, state: dict) -> None:
    """Optimizer / scheduler / counters: plain tensors and containers (weights-only loadable)."""
    torch.save(state, path)


def load_state(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable checkpoint the same way
        raise X2IFileError(f"checkpoint state '{path}' cannot be read ({exc})") from exc
