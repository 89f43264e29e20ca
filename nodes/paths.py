"""Model folders of the pack: ``models/mllm`` (HF model folders) and ``models/x2i``.

Registered with ``folder_paths`` without clobbering entries users configured in
``extra_model_paths.yaml``.  Names coming from widgets or API prompts are
resolved only inside the configured folders; a bad name is an X2I error (shown on the node by
``common.user_errors``).
"""

from __future__ import annotations

import os

import folder_paths

from ..x2i_core.errors import X2IFileError, X2IInputError
from ..x2i_core.io import weights_file_kind

MLLM_FOLDER = "mllm"
X2I_FOLDER = "x2i"
X2I_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".sft"}


def register_folders() -> None:
    for name, exts in ((MLLM_FOLDER, {""}), (X2I_FOLDER, X2I_EXTENSIONS)):
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, old_exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.insert(0, default)
            if isinstance(old_exts, set):
                old_exts.update(exts)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))


def _inside(root: str, path: str) -> bool:
    """Lexically inside ``root`` (symlinks the user placed in a model folder are allowed)."""
    root = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.abspath(path))
    return path.startswith(root + os.sep)


def list_mllm_dirs() -> list[str]:
    """Sub-folders (up to two levels deep) of every mllm path that hold a config.json."""
    found = set()
    for root in folder_paths.get_folder_paths(MLLM_FOLDER):
        if not os.path.isdir(root):
            continue
        for first in sorted(os.listdir(root)):
            p1 = os.path.join(root, first)
            if not os.path.isdir(p1):
                continue
            if os.path.isfile(os.path.join(p1, "config.json")):
                found.add(first)
                continue
            for second in sorted(os.listdir(p1)):
                p2 = os.path.join(p1, second)
                if os.path.isfile(os.path.join(p2, "config.json")):
                    found.add(f"{first}/{second}")
    return sorted(found)


def _safe_name(name: str, what: str) -> str:
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
    if (not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\"))
            or ".." in parts or (len(name) > 1 and name[1] == ":")):
        raise X2IInputError(f"{what} name {name!r} is not a plain name inside the {what} folders")
    return name


def _resolve(folder: str, name: str, what: str, exists, listed) -> str:
    """The path of ``name`` in ``folder``'s paths.  Only names the loader itself lists (its dropdown
    entries) are accepted, so nothing a prompt sends can reach outside the model folders; symlinks the
    folder's owner placed there are followed, as ComfyUI's own loaders do."""
    _safe_name(name, what)
    roots = folder_paths.get_folder_paths(folder)
    if name in listed():
        for root in roots:
            path = os.path.join(root, name)
            if exists(path) and _inside(root, path):
                return path
    raise X2IFileError(f"{what} '{name}' was not found in the {folder} folders ({', '.join(roots)}); "
                     "expected one of the names the loader lists")


def resolve_mllm_dir(name: str) -> str:
    """A Hugging Face model folder inside the ``mllm`` folders."""
    return _resolve(MLLM_FOLDER, name, "MLLM", os.path.isdir, list_mllm_dirs)


KIND_LOADERS = {"alignnet": "X2I AlignNet Loader", "lightcontrol": "X2I LightControl Loader"}
KIND_NAMES = {"alignnet": "AlignNet", "lightcontrol": "LightControl"}


def _kind(name: str) -> str | None:
    path = folder_paths.get_full_path(X2I_FOLDER, name)
    return weights_file_kind(path) if path else None


def list_x2i_files(kind: str | None = None) -> list[str]:
    """The weights files in the ``x2i`` folders; with ``kind`` ("alignnet" / "lightcontrol") only those that are
    of that kind or of no recorded kind (decided from each file's own header or metadata, cached - never its
    name), so an AlignNet list shows no LightControl and the other way round."""
    names = folder_paths.get_filename_list(X2I_FOLDER)
    if kind is None:
        return names
    return [n for n in names if _kind(n) in (kind, None)]


def resolve_x2i_file(name: str, kind: str | None = None) -> str:
    """A weights file inside the ``x2i`` folders (of ``kind``, when given: a file of the other kind, chosen
    anyway through an API prompt, is refused naming the loader it belongs to)."""
    if kind is not None and isinstance(name, str) and name in folder_paths.get_filename_list(X2I_FOLDER):
        found = _kind(name)
        if found not in (kind, None):
            raise X2IFileError(f"'{name}' is a {KIND_NAMES[found]} file (so its header records); this loader loads "
                               f"{KIND_NAMES[kind]} files - load it with {KIND_LOADERS[found]}")
    return _resolve(X2I_FOLDER, name, "X2I model file", os.path.isfile, lambda: list_x2i_files(kind))
