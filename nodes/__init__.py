"""The ComfyUI layer of the X2I pack (V3 schema).

The node classes are added by the ComfyUI-pack work (MLLM loader/encode,
AlignNet loader/project, X2I sampler); this module already registers the
extension so the pack loads in ComfyUI.
"""

from __future__ import annotations

import logging

log = logging.getLogger("x2i")

NODES: list = []


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class X2IExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return X2IExtension()
