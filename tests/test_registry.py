"""x2i_core.registry is the one table of model facts, and it is consistent with what reads it.

The nodes part reads ``nodes/comfy_qwen.py`` as source (importing it needs the ComfyUI host): its native
text encoders name registry releases and restate no dimensions."""

import ast
import json
import os
import re

import pytest

from x2i_core import mllm, registry
from x2i_core.alignnet import AlignNetConfig
from x2i_core.errors import X2IFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ids_names_and_model_types_are_unique_and_every_release_has_its_family():
    ids = [f.id for f in registry.MLLM_FAMILIES]
    types = [t for f in registry.MLLM_FAMILIES for t in f.model_types]
    names = [m.name for m in registry.KNOWN_MLLMS]
    assert len(set(ids)) == len(ids) and len(set(types)) == len(types) and len(set(names)) == len(names)
    for m in registry.KNOWN_MLLMS:
        assert m in registry.family(m.family).releases, m
        assert registry.release(m.name) is m
    assert all(f.releases for f in registry.MLLM_FAMILIES)


@pytest.mark.parametrize("fam", registry.MLLM_FAMILIES, ids=lambda f: f.id)
def test_every_family_imports_its_encoder_and_the_encoder_reads_the_registry(fam):
    for t in fam.model_types:
        assert registry.family_of_model_type(t) is fam
        cls = mllm.encoder_class(t)
        assert cls.__name__ == fam.encoder and cls.__module__ == f"x2i_core.mllm.{fam.module}"
        assert mllm.FAMILIES[t] == (fam.module, fam.encoder, fam.remote_code, fam.description)
    assert (cls.family, cls.display, tuple(cls.model_types), cls.modalities) == (
        fam.id, fam.display, fam.model_types, fam.modalities)
    assert bool(getattr(cls, "trust_remote_code", False)) == fam.remote_code


def test_the_loader_names_every_supported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(X2IFileError, match="model_type 'llama'; supported: qwen2_5_vl") as err:
        mllm.load_mllm(str(tmp_path))
    for fam in registry.MLLM_FAMILIES:
        assert all(t in str(err.value) for t in fam.model_types) and fam.description in str(err.value)


def test_alignnet_presets_are_the_released_pairs():
    for m in registry.KNOWN_MLLMS:
        if m.alignnet is None:
            continue
        cfg = AlignNetConfig.preset(m.name.lower().replace("-instruct", ""))
        assert (cfg.in_channels, cfg.input_dim, cfg.fusion) == (m.channels, m.hidden, m.alignnet)


def _native_families() -> list[ast.Call]:
    tree = ast.parse(open(os.path.join(ROOT, "nodes", "comfy_qwen.py"), encoding="utf-8").read())
    (table,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "FAMILIES" for t in n.targets)]
    return [c for c in table.elts if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "Family"]


def test_comfy_native_text_encoders_resolve_to_registry_releases():
    calls = _native_families()
    assert len(calls) >= 2
    for call in calls:
        release = call.args[0].value
        assert registry.release(release).family == "qwen2.5-vl", release
        ints = [a.value for a in ast.walk(call) if isinstance(a, ast.Constant) and type(a.value) is int]
        assert not ints, f"Family({release!r}) restates numbers {ints}; they come from the registry"


def test_node_files_restate_no_dimensions():
    for name in sorted(os.listdir(os.path.join(ROOT, "nodes"))):
        if name.endswith(".py"):
            text = open(os.path.join(ROOT, "nodes", name), encoding="utf-8").read()
            assert not re.search(r"C=\d+, H=\d+", text), name
