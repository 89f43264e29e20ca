"""Caption streams for training: text lines, JSONL, Parquet and WebDataset shards.

A stream is deterministic given its sources and seed: sources are expanded
and sorted, their order is reshuffled per epoch with ``(seed, epoch)``, and
each file is read lazily.  A position is just "samples consumed", so resume
skips that many captions (cheap for captions) and the order continues exactly.
"""

from __future__ import annotations

import glob
import json
import os
import random
import tarfile
from typing import Iterator, Sequence

from ..errors import X2IInputError

TEXT_EXTS = (".txt",)
JSONL_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)
TAR_EXTS = (".tar",)
CAPTION_KEYS = ("caption", "caption_en", "text", "prompt")


def expand_sources(paths: Sequence[str] | str) -> list[str]:
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        if not matches:
            raise X2IInputError(f"data path '{p}' matches no file")
        for m in matches:
            if os.path.isdir(m):
                for root, _, names in sorted(os.walk(m)):
                    files.extend(os.path.join(root, n) for n in sorted(names)
                                 if n.endswith(TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS + TAR_EXTS))
            elif os.path.isfile(m):
                files.append(m)
            else:
                raise X2IInputError(f"data path '{m}' does not exist")
    if not files:
        raise X2IInputError(f"data paths {list(paths)} hold no caption files (.txt, .jsonl, .parquet, .tar)")
    return files


def _pick(record: dict, key: str | None, where: str) -> str | None:
    keys = [key] if key else CAPTION_KEYS
    for k in keys:
        if k in record and isinstance(record[k], str):
            return record[k]
    return None


def read_file(path: str, key: str | None = None) -> Iterator[str]:
    low = path.lower()
    if low.endswith(TEXT_EXTS):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line
    elif low.endswith(JSONL_EXTS):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise X2IInputError(f"{path}:{n} is not valid JSON ({exc})") from exc
                cap = _pick(rec, key, f"{path}:{n}") if isinstance(rec, dict) else None
                if cap and cap.strip():
                    yield cap.strip()
    elif low.endswith(PARQUET_EXTS):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise X2IInputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        table = pq.read_table(path)
        cols = [key] if key else [c for c in CAPTION_KEYS if c in table.column_names][:1]
        if not cols or cols[0] not in table.column_names:
            raise X2IInputError(f"{path}: no caption column (looked for {[key] if key else list(CAPTION_KEYS)})")
        for cap in table.column(cols[0]).to_pylist():
            if isinstance(cap, str) and cap.strip():
                yield cap.strip()
    elif low.endswith(TAR_EXTS):
        with tarfile.open(path) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name = member.name.lower()
                if name.endswith(".txt") or name.endswith(".json"):
                    data = tf.extractfile(member).read().decode("utf-8", errors="replace")
                    if name.endswith(".json"):
                        try:
                            rec = json.loads(data)
                        except json.JSONDecodeError:
                            continue
                        cap = _pick(rec, key, f"{path}:{member.name}") if isinstance(rec, dict) else None
                    else:
                        cap = data
                    if cap and cap.strip():
                        yield cap.strip()
    else:
        raise X2IInputError(f"{path}: unknown caption file type; expected .txt, .jsonl, .parquet or .tar")


class CaptionStream:
    """An endless, deterministic stream of captions over epochs."""

    def __init__(self, paths, key: str | None = None, seed: int = 0, shuffle: bool = True):
        self.files = expand_sources(paths)
        self.key = key
        self.seed = seed
        self.shuffle = shuffle

    def epoch_files(self, epoch: int) -> list[str]:
        files = list(self.files)
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(files)
        return files

    def __iter__(self) -> Iterator[str]:
        epoch = 0
        while True:
            produced = False
            for f in self.epoch_files(epoch):
                for cap in read_file(f, self.key):
                    produced = True
                    yield cap
            if not produced:
                raise X2IInputError(f"dataset {self.files[:3]}{'…' if len(self.files) > 3 else ''} has no captions")
            epoch += 1

    def iterate_from(self, position: int) -> Iterator[str]:
        it = iter(self)
        for _ in range(position):
            next(it)
        return it

    def head(self, n: int) -> list[str]:
        out = []
        for f in self.epoch_files(0):
            for cap in read_file(f, self.key):
                out.append(cap)
                if len(out) >= n:
                    return out
        return out

