"""One walker over the image datasets of the FLUX trainers: a folder of files grouped by name, a JSONL of
records (paths relative to the file), or WebDataset ``.tar`` shards (members grouped by the key before the
first dot: ``000001.png`` + ``000001.txt``).  The LoRA and LightControl trainers say which fields make a
sample; this module reads, groups and reports bad records by file and line.  Images stay unopened
(:class:`ImageSource`) until the trainer encodes them, so an unreadable one is skipped and counted there.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from typing import Iterator

from ..errors import X2IInputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """An image on disk (``path``) or inside a shard (``data``), opened on demand."""

    name: str                     # for messages and reports: the path, or "shard.tar:member"
    path: str | None = None
    data: bytes | None = dataclasses.field(default=None, repr=False)

    def open(self):
        """The image as RGB (fully read, file closed); PIL's errors (OSError, ValueError) pass through."""
        from PIL import Image

        with Image.open(self.path if self.path is not None else io.BytesIO(self.data)) as im:
            im.load()
            return im.convert("RGB")


def image_file(path: str) -> ImageSource:
    return ImageSource(path, path=path)


def check_exists(path: str | None, expected: str) -> str:
    if not path or not os.path.exists(path):
        raise X2IInputError(f"data.path '{path}' does not exist; expected {expected}")
    return path


def jsonl_records(path: str) -> Iterator[tuple[str, dict]]:
    """``("file:line", record)`` for every non-blank line; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            yield where, json_object(line, where)


def relative_to(jsonl_path: str, name: str) -> str:
    """A path written in a JSONL record, relative to the JSONL's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(jsonl_path)), name)


def folder_index(path: str) -> dict[str, dict[str, str]]:
    """``{stem: {".ext": full path}}`` of the files directly in a folder (extensions lower-cased)."""
    index: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            stem, ext = os.path.splitext(name)
            index.setdefault(stem, {})[ext.lower()] = full
    return index


def first_image(files: dict[str, str]) -> str | None:
    return next((files[e] for e in IMAGE_EXTS if e in files), None)


def json_object(text: str | bytes, where: str) -> dict:
    """``text`` parsed as one JSON object; anything else is an error naming ``where`` (a file, file:line or
    shard:member)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise X2IInputError(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise X2IInputError(f"{where} must be a JSON object, found {type(data).__name__}")
    return data


def read_json_file(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json_object(fh.read(), path)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def tar_groups(path: str) -> dict[str, dict[str, bytes]]:
    """``{key: {field: bytes}}`` of a WebDataset shard, keys sorted (``a/001.source.png`` -> key ``a/001``,
    field ``source.png``; fields lower-cased)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                key, _, field = base.partition(".")
                groups.setdefault(os.path.join(folder, key), {})[field.lower()] = tf.extractfile(m).read()
    except tarfile.TarError as exc:
        raise X2IInputError(f"data.path '{path}' is not a readable .tar shard ({exc})") from exc
    return dict(sorted(groups.items()))


def tar_image(path: str, key: str, group: dict[str, bytes], prefix: str = "") -> ImageSource | None:
    """The group's image field (``png`` / ``jpg`` / ... after ``prefix``), or None."""
    for ext in IMAGE_EXTS:
        field = prefix + ext[1:]
        if field in group:
            return ImageSource(f"{path}:{key}.{field}", data=group[field])
    return None


def tar_text(group: dict[str, bytes], *fields: str) -> str | None:
    for f in fields:
        if group.get(f):
            return group[f].decode("utf-8", errors="replace").strip()
    return None


__all__ = ["IMAGE_EXTS", "ImageSource", "check_exists", "first_image", "folder_index", "image_file", "json_object",
           "jsonl_records", "read_json_file", "read_text", "relative_to", "tar_groups", "tar_image", "tar_text"]
