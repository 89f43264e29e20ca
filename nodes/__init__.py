"""The ComfyUI layer of the X2I pack (V3 schema).

Thin by design: sockets, widgets, model management and type conversion; all
model math lives in ``x2i_core``.  A node group whose optional dependency is
missing is skipped with a logged reason; the rest of the pack still loads.
"""

from __future__ import annotations

import logging

log = logging.getLogger("x2i")


def _collect_nodes() -> list:
    from . import paths

    paths.register_folders()
    found = []
    try:
        from .x2i_nodes import NODES as core_nodes

        found.extend(core_nodes)
    except ImportError as exc:  # e.g. transformers/diffusers missing in this ComfyUI
        log.error("X2I: core nodes disabled: %s (pip install -r requirements.txt in the pack folder)", exc)
    try:
        from .lightcontrol_nodes import NODES as lightcontrol_nodes

        found.extend(lightcontrol_nodes)
    except ImportError as exc:
        log.error("X2I: LightControl nodes disabled: %s", exc)
    return found


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    node_list = _collect_nodes()

    class X2IExtension(ComfyExtension):
        async def get_node_list(self):
            return list(node_list)

    return X2IExtension()
