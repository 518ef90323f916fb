"""ComfyUI registration (V1 node classes). Imported only by the guarded root ``__init__.py``."""

from __future__ import annotations

from .encoders import XDiTCLIPLoader, XDiTDualCLIPLoader, XDiTVAELoader
from .loaders import XDiTCheckpointLoader, XDiTUNetLoader
from .sampler import XDiTKSampler

NODE_CLASS_MAPPINGS = {
    "XDiTCheckpointLoader": XDiTCheckpointLoader,
    "XDiTUNetLoader": XDiTUNetLoader,
    "XDiTKSampler": XDiTKSampler,
    "XDiTVAELoader": XDiTVAELoader,
    "XDiTCLIPLoader": XDiTCLIPLoader,
    "XDiTDualCLIPLoader": XDiTDualCLIPLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "XDiTCheckpointLoader": "Load Checkpoint (xDiT Multi-GPU)",
    "XDiTUNetLoader": "Load UNet (xDiT Multi-GPU)",
    "XDiTKSampler": "KSampler (xDiT Multi-GPU)",
    "XDiTVAELoader": "Load VAE (xDiT)",
    "XDiTCLIPLoader": "Load CLIP (xDiT)",
    "XDiTDualCLIPLoader": "Load Dual CLIP (xDiT)",
}
