"""ComfyUI xDiT Multi-GPU: one diffusion-transformer generation on all of a machine's GPUs.

Importing this package imports neither ComfyUI, Ray nor a GPU library and changes nothing; the
ComfyUI registration lives behind a guard in the repository root ``__init__.py``.

Layers (imports point one way only)::

    nodes/  ->  engine/  ->  executor/  ->  worker/  ->  parallel/ + models/
"""

__version__ = "0.1.0"
