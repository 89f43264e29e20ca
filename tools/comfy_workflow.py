"""Workflow files for the test host: the UI (drag-and-drop) format to the API format (dev tooling).

* ``ui_to_api(workflow, object_info)`` - a UI-format workflow (nodes, links,
  widgets_values) to the API format ``/prompt`` and the executor take, so tests
  execute the very files we ship.
* ``load_workflow(name)`` - a shipped workflow from ``workflows/``.
* ``point_at_tiny(api, names)`` - an API prompt's model loaders pointed at the
  tiny models, its image size and step count shrunk.
"""

from __future__ import annotations

import json
import os

from .comfy_fetch import ROOT

SKIP_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (nodes, links, widgets_values) to API format.

    Widget values are taken in input order, skipping the extra value the
    frontend stores after inputs with ``control_after_generate``.
    """
    links = {}
    for link in workflow.get("links", []):
        link_id, from_node, from_slot, to_node, to_slot = link[:5]
        links[link_id] = (str(from_node), from_slot)
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in SKIP_TYPES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        if ntype not in object_info:
            raise KeyError(f"workflow node {node['id']} has unknown type {ntype!r}")
        info = object_info[ntype]
        ordered = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
        inputs = {}
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                linked[inp["name"]] = links[inp["link"]]
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {node['id']}: dict widgets_values are not supported")
        vi = 0
        for name, spec in ordered:
            if name in linked:
                inputs[name] = [linked[name][0], linked[name][1]]
                if _is_widget(spec) and vi < len(values):
                    vi += 1 + (1 if (len(spec) > 1 and spec[1].get("control_after_generate")) else 0)
                continue
            if _is_widget(spec):
                if vi >= len(values):
                    continue
                inputs[name] = values[vi]
                vi += 1
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    vi += 1
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


def load_workflow(name: str) -> dict:
    with open(os.path.join(ROOT, "workflows", name), encoding="utf-8") as fh:
        return json.load(fh)


def point_at_tiny(api: dict, names: dict, width: int = 64, height: int = 48, steps: int = 2) -> dict:
    """Point an API prompt's stock model loaders and the X2I loaders at the tiny models (``names`` from
    :func:`prepare_base`) and shrink its image size and step count; returns ``api`` (changed in place)."""
    fields = {"UNETLoader": ("unet_name", "unet"), "VAELoader": ("vae_name", "vae"),
              "X2IMLLMLoader": ("model_name", "mllm"), "X2IAlignNetLoader": ("alignnet_name", "alignnet")}
    for node in api.values():
        ins = node["inputs"]
        if node["class_type"] in fields:
            field, key = fields[node["class_type"]]
            ins[field] = names[key]
        for key, value in (("width", width), ("height", height), ("steps", steps)):
            if key in ins and not isinstance(ins[key], list):
                ins[key] = value
    return api
