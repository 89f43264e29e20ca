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
    # (module, what it provides); a group whose import fails is skipped with the reason logged.
    groups = [("x2i_nodes", "core nodes"), ("lightcontrol_nodes", "LightControl nodes"),
              ("chat_nodes", "chat and reasoning nodes"), ("clip_nodes", "native-CLIP encode node"),
              ("conditioning_nodes", "conditioning blend node")]
    import importlib

    for module, what in groups:
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module}":
                continue  # group not present in this version of the pack
            log.error("X2I: %s disabled: %s (pip install -r requirements.txt in the pack folder)", what, exc)
            continue
        except ImportError as exc:  # e.g. transformers/diffusers missing in this ComfyUI
            log.error("X2I: %s disabled: %s (pip install -r requirements.txt in the pack folder)", what, exc)
            continue
        found.extend(mod.NODES)
    return found


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    node_list = _collect_nodes()

    class X2IExtension(ComfyExtension):
        async def get_node_list(self):
            return list(node_list)

    return X2IExtension()
