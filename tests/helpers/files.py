"""Small file-making helpers shared by the bad-input tests."""

import json


def with_config(path, out=None, **changes):
    """Our safetensors file ``path`` (AlignNet or LightControl) rewritten to ``out`` (default: in place) with its
    stored config claiming ``changes``; the tensors are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    cfg = json.loads(meta["config"])
    cfg.update(changes)
    meta["config"] = json.dumps(cfg)
    save_file(load_file(str(path)), str(out or path), metadata=meta)
    return str(out or path)
