"""Safe reading and atomic writing of weight files and outputs.

Reading never unpickles code: safetensors are preferred; torch files are read
with ``torch.load(weights_only=True)``, whose restricted unpickler admits only
tensors, containers and plain data.  Writing goes to a temporary file in the
destination folder that is renamed into place, so an interrupted write never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from typing import Any, Iterator, Mapping

import torch

from .errors import X2IFileError, X2IUnsafeFileError

_PICKLE_HINT = (
    "It is a pickle that needs arbitrary code execution to load; x2i never does that. "
    "Convert it once with the tool that made it into safetensors, or use a weights-only "
    "torch file (torch.save of plain tensors and dicts)."
)


@dataclasses.dataclass
class LoadedWeights:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None
    nested: dict[str, Any] | None = None  # a torch file holding a dict that is not a flat state dict
    kind: str = "safetensors"


def sniff_format(path: str) -> str:
    """'safetensors', 'torch-zip', 'pickle' or 'unknown', from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


_LIGHTCONTROL_NAME = re.compile(r"^(?:module\.|controlnet\.)?\d+\.(?:mid_convs|down_res|time_embedding)\.")
_ALIGNNET_NAME = re.compile(r"^(?:module\.)?mlp\.(?:projector|fc|layernorm)\.")
_KIND_CACHE: dict[tuple, str | None] = {}


def weights_file_kind(path: str | os.PathLike) -> str | None:
    """``"alignnet"``, ``"lightcontrol"`` or None (not known) for an X2I weights file, from what the file records
    about itself, read without loading a tensor or running any code: our safetensors' ``x2i_format`` metadata,
    else the tensor names in the safetensors header or in a torch zip file's pickle (its opcodes are scanned for
    strings, never executed).  Cached by path, size and modification time."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _KIND_CACHE:
        try:
            _KIND_CACHE[key] = _read_kind(path)
        except Exception:  # noqa: BLE001 - a damaged file is of no known kind; loading it reports why
            _KIND_CACHE[key] = None
    return _KIND_CACHE[key]


def _kind_of_names(names) -> str | None:
    for name in names:
        if _ALIGNNET_NAME.match(name):
            return "alignnet"
        if _LIGHTCONTROL_NAME.match(name):
            return "lightcontrol"
    return None


def _read_kind(path: str) -> str | None:
    fmt = sniff_format(path)
    if fmt == "safetensors":
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None) or {}
        recorded = meta.get("x2i_format")
        if recorded in ("alignnet", "lightcontrol"):
            return recorded
        return _kind_of_names(header)
    if fmt == "torch-zip":
        import pickletools

        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None or zf.getinfo(name).file_size > 64 * 2**20:
                return None
            data = zf.read(name)
        strings = (arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str))
        return _kind_of_names(strings)
    return None


def _check_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise X2IFileError(f"{what} file '{path}' does not exist")
    if os.path.isdir(path):
        raise X2IFileError(f"{what} file '{path}' is a folder; expected a .safetensors or torch weights file")
    if os.path.getsize(path) == 0:
        raise X2IFileError(f"{what} file '{path}' is empty (0 bytes); download it again")
    return path


def load_weights_file(path: str | os.PathLike, what: str = "weights") -> LoadedWeights:
    path = _check_file(path, what)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            tensors = {}
            with safe_open(path, framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise X2IFileError(
                f"{what} file '{path}' is a corrupt or truncated safetensors file ({exc}); download it again"
            ) from exc
        return LoadedWeights(tensors, dict(meta), None, "safetensors")
    if fmt in ("torch-zip", "pickle"):
        if fmt == "torch-zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
                if bad is not None:
                    raise X2IFileError(f"{what} file '{path}' is corrupt (entry {bad!r} fails its checksum)")
            except zipfile.BadZipFile as exc:
                raise X2IFileError(f"{what} file '{path}' is a truncated or corrupt torch file ({exc})") from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise X2IUnsafeFileError(f"{what} file '{path}' was refused. {_PICKLE_HINT} (detail: {exc})") from exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise X2IFileError(f"{what} file '{path}' cannot be read as torch weights ({exc})") from exc
        if not isinstance(obj, Mapping):
            raise X2IFileError(f"{what} file '{path}' holds a {type(obj).__name__}, expected a dict of tensors")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return LoadedWeights(dict(obj), None, None, "torch")
        return LoadedWeights({}, None, dict(obj), "torch")
    raise X2IFileError(
        f"{what} file '{path}' is neither safetensors nor a torch weights file "
        "(unrecognised header); it may be truncated, an HTML error page or another format"
    )


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), so another
    thread never sees a temporary umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str, folder: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode a plain ``open()`` /
    ``os.makedirs()`` would have given it (0666 / 0777 less the umask)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def make_temp_dir(prefix: str, parent: str) -> str:
    """A fresh temporary folder in ``parent`` with a plain folder's mode (to be renamed into place)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    plain_mode(tmp, folder=True)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it into place on success (with the mode a plain
    write would have given it: 0666 less the umask)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise X2IFileError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise X2IFileError(f"output folder '{folder}' is not writable")
    suffix = suffix if suffix is not None else os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", suffix=suffix, dir=folder)
    except OSError as exc:
        raise X2IFileError(f"output folder '{folder}' is not writable ({exc.strerror})") from exc
    os.close(fd)
    try:
        yield tmp
        plain_mode(tmp)  # after the writer: some (safetensors) replace the file they are given
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata: Mapping[str, str] | None = None):
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata or {}))


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def atomic_write_json(path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
