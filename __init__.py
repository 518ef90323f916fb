"""ComfyUI entry point of the xDiT Multi-GPU node pack.

ComfyUI loads this file as a package from ``custom_nodes/``. The nodes are registered only when
ComfyUI itself is importable; importing the ``xdit_multigpu`` package alone changes nothing.
"""

import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./js"

try:
    import comfy.sample  # noqa: F401  (the guard: are we inside ComfyUI?)
except ImportError:  # plain `import` of the repo (tests, tools): register nothing
    pass
else:
    # Import the package under its own name (not this folder's path-derived module name), so that
    # Ray workers, which get this folder on PYTHONPATH, unpickle the same classes.
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.append(_here)
    from xdit_multigpu.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    from xdit_multigpu.engine.lifecycle import install_host_hooks

    install_host_hooks()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
