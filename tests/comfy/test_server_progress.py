"""A real ComfyUI server (--preview-method auto) over its websocket: the xDiT KSampler on 2 CPU ranks
sends ComfyUI's ``progress`` message for every step and binary preview frames, as the stock KSampler
does; ``/interrupt`` mid-run ends the prompt as interrupted and the next prompt still runs parallel.
"""

from __future__ import annotations

import copy
import json
import pathlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.conftest import COMFYUI_PATH, REPO

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(900)]

websocket = pytest.importorskip("websocket")


@pytest.fixture(scope="module")
def server():
    from xdit_multigpu.testing.server import ComfyServer, prepare_base_dir
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    base = prepare_base_dir(REPO / ".host" / "test-server")
    tiny = write_tiny_models(str(base / "models"), families=["sd3", "clip_l", "vae16"], comfy_root=COMFYUI_PATH)
    srv = ComfyServer(pathlib.Path(COMFYUI_PATH), base,
                      extra_args=["--output-directory", str(base / "output"), "--preview-method", "auto"])
    srv.start()
    srv.tiny = tiny
    srv.info = srv.get("/object_info")
    yield srv
    srv.stop()


class Listener:
    """One websocket client; every receive is bounded."""

    def __init__(self, server: Any) -> None:
        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=5)
        self.messages: list[Any] = []  # dicts (JSON) and ("binary", bytes)

    def until(self, done: Callable[[Any], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            msg = ("binary", raw) if isinstance(raw, bytes) else json.loads(raw)
            self.messages.append(msg)
            if done(msg):
                return msg
        raise TimeoutError(f"no matching websocket message within {timeout:.0f} s")

    def close(self) -> None:
        self.ws.close()


def _ended(prompt_id: str) -> Callable[[Any], bool]:
    def done(m: Any) -> bool:
        if not isinstance(m, dict) or m.get("data", {}).get("prompt_id") != prompt_id:
            return False
        return m["type"] in ("execution_success", "execution_error", "execution_interrupted") or (
            m["type"] == "executing" and m["data"].get("node") is None)

    return done


def _prompt(server, steps: int = 3):
    from xdit_multigpu.testing.demo import adapt_to_tiny, load_example

    prompt = adapt_to_tiny(load_example("sd3_xdit_multigpu", server.info), server.tiny, "cpu:2", steps, 128)
    loader = next(i for i, n in prompt.items() if n["class_type"] == "XDiTUNetLoader")
    prompt[loader]["inputs"]["parallel_strategy"] = "USP"
    sampler = next(i for i, n in prompt.items() if n["class_type"] == "XDiTKSampler")
    return prompt, sampler


def _queue(server, listener: Listener, prompt) -> str:
    code, body = server.queue(copy.deepcopy(prompt), client_id=listener.client_id)
    assert code == 200, body
    return body["prompt_id"]


def _progress(listener: Listener, prompt_id: str) -> list[dict[str, Any]]:
    return [m["data"] for m in listener.messages
            if isinstance(m, dict) and m["type"] == "progress" and m["data"].get("prompt_id") == prompt_id]


def _assert_parallel_and_stock(server, entry, prompt) -> None:
    from PIL import Image

    from xdit_multigpu.testing.demo import node_text
    from xdit_multigpu.testing.server import saved_images
    from xdit_multigpu.testing.workflow import stock_equivalent

    assert entry["status"]["status_str"] == "success", entry["status"]
    status = node_text(entry, "XDiTKSampler", prompt)
    assert "cfg 1 x ulysses 2 x ring 1" in status and "one device" not in status, status
    stock = server.run(stock_equivalent(prompt), timeout=300)
    (a,), (b,) = saved_images(entry, server.base / "output"), saved_images(stock, server.base / "output")
    a, b = (np.asarray(Image.open(p)).astype(np.int16) for p in (a, b))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()


def test_progress_for_every_step_and_previews_on_two_cpu_ranks(server):
    prompt, sampler = _prompt(server, steps=3)
    ws = Listener(server)
    try:
        pid = _queue(server, ws, prompt)
        ws.until(_ended(pid), timeout=600)
    finally:
        ws.close()
    progress = [p for p in _progress(ws, pid) if p.get("node") == sampler]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 3), (2, 3), (3, 3)], _progress(ws, pid)
    frames = [m[1] for m in ws.messages if isinstance(m, tuple)]
    assert frames, "no binary preview frame arrived"
    assert int.from_bytes(frames[0][:4], "big") == 1  # BinaryEventTypes.PREVIEW_IMAGE
    assert frames[0][8:10] == b"\xff\xd8"  # a JPEG after the 8-byte header
    _assert_parallel_and_stock(server, server.wait(pid, timeout=60), prompt)


def test_interrupt_mid_run_then_next_prompt_runs_parallel(server):
    long_prompt, sampler = _prompt(server, steps=400)
    ws = Listener(server)
    try:
        pid = _queue(server, ws, long_prompt)
        ws.until(lambda m: isinstance(m, dict) and m["type"] == "progress" and m["data"].get("node") == sampler
                 and m["data"].get("prompt_id") == pid and m["data"]["value"] >= 2, timeout=600)
        t0 = time.monotonic()
        assert server.post("/interrupt", {"prompt_id": pid})[0] == 200
        end = ws.until(_ended(pid), timeout=60)
        assert end["type"] == "execution_interrupted" and end["data"]["node_id"] == sampler, end
        assert time.monotonic() - t0 < 30
    finally:
        ws.close()
    assert max(p["value"] for p in _progress(ws, pid)) < 400
    assert server.wait(pid, timeout=30)["status"]["status_str"] == "error"
    prompt, _ = _prompt(server, steps=3)
    _assert_parallel_and_stock(server, server.run(copy.deepcopy(prompt), timeout=600), prompt)
