"""Worker pools live as long as ComfyUI wants them: released on ``/free`` and at exit."""

from __future__ import annotations

import atexit
import logging
import sys
import threading

from .. import patching

log = logging.getLogger("xdit_multigpu")
_installed = False


def _release_in_background() -> None:
    # /free arrives on the server's event loop; releasing waits for a running job, so do it off-loop.
    threading.Thread(target=release_pools, name="xdit-release", daemon=True).start()


def release_pools() -> None:
    from .engine import get_engine

    try:
        get_engine().release_all()
    except Exception:  # noqa: BLE001  (shutdown path: log, never raise into ComfyUI)
        log.exception("[xDiT] releasing worker pools failed")
    vae = sys.modules.get("xdit_multigpu.engine.vae")  # loaded only once a parallel VAE was made
    if vae is not None:
        try:
            vae.release_replicas()
        except Exception:  # noqa: BLE001  (shutdown path: log, never raise into ComfyUI)
            log.exception("[xDiT] releasing the parallel VAE's device copies failed")


def install_host_hooks() -> None:
    """Register the ``/free`` hook and the exit handler (idempotent)."""
    global _installed
    if _installed:
        return
    patching.install_free_hook(_release_in_background)
    atexit.register(release_pools)
    _installed = True
