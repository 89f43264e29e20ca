"""A checkout of the reference repository (``OPPO-Mente-Lab/X2I``) for the oracles that run its own code.

Its code is read at test time, like the ComfyUI host, and never committed.  Where it comes from, first found:

1. ``X2I_REFERENCE_REPO``: a checkout or a git directory;
2. a git mirror of it on this machine (``/work/.mirror/OPPO-Mente-Lab+X2I/repo``, where this workplace keeps
   the repositories it fetched);
3. ``~/.cache/x2i/reference/OPPO-Mente-Lab-X2I``, cloned there when the network allows.

A git directory is exported once (``git archive``) into ``~/.cache/x2i/reference/X2I-<commit>``.  Without any
of them the oracle tests skip, saying so.
"""

import os
import subprocess

URL = "https://github.com/OPPO-Mente-Lab/X2I"
MIRROR = "/work/.mirror/OPPO-Mente-Lab+X2I/repo"


def _cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "x2i", "reference")


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=True,
                          timeout=300).stdout.strip()


def _export(git_dir: str, folders: tuple[str, ...]) -> str:
    commit = _git(git_dir, "rev-parse", "HEAD")
    out = os.path.join(_cache(), f"X2I-{commit[:12]}")
    if all(os.path.isdir(os.path.join(out, f)) for f in folders):
        return out
    tmp = out + ".tmp"
    subprocess.run(["rm", "-rf", tmp], check=True)
    os.makedirs(tmp)
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", *folders], capture_output=True,
                             check=True, timeout=300).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True, timeout=300)
    subprocess.run(["rm", "-rf", out], check=True)
    os.replace(tmp, out)
    return out


def reference_checkout(*folders: str) -> str | None:
    """A folder holding ``folders`` of the reference repository (e.g. ``"minicpm"``), or None."""
    candidates = [os.environ.get("X2I_REFERENCE_REPO"), MIRROR, os.path.join(_cache(), "OPPO-Mente-Lab-X2I")]
    for path in filter(None, candidates):
        if all(os.path.isdir(os.path.join(path, f)) for f in folders):
            return path
        git_dir = path if os.path.isfile(os.path.join(path, "HEAD")) else os.path.join(path, ".git")
        if os.path.isfile(os.path.join(git_dir, "HEAD")):
            try:
                return _export(git_dir, folders)
            except (subprocess.SubprocessError, OSError):
                continue
    clone = os.path.join(_cache(), "OPPO-Mente-Lab-X2I")
    try:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", URL, clone], capture_output=True, check=True,
                       timeout=120, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    except (subprocess.SubprocessError, OSError):
        return None
    return clone if all(os.path.isdir(os.path.join(clone, f)) for f in folders) else None
