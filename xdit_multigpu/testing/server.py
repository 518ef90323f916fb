"""Drive a real ComfyUI server over HTTP: start it on loopback with this pack, queue workflows, wait.

Used by the demo (``make demo``) and the server-level tests. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "xdit-multigpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_base_dir(base: pathlib.Path, extra_custom_nodes: dict[str, pathlib.Path] | None = None) -> pathlib.Path:
    """A ComfyUI ``--base-directory``: models/, input/, output/, user/ and custom_nodes/ with this pack.

    The pack is linked, not copied, so the server runs the working tree.
    """
    for sub in ("models", "input", "output", "user", "custom_nodes", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {PACK_DIR_NAME: REPO, **(extra_custom_nodes or {})}
    for name, target in links.items():
        link = base / "custom_nodes" / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return base


@dataclass
class ComfyServer:
    """A ComfyUI ``main.py`` process on 127.0.0.1 (``--cpu``), with its log in ``base/server.log``."""

    comfy_root: pathlib.Path
    base: pathlib.Path
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ComfyServer:
        self.port = self.port or free_port()
        log = open(self.base / "server.log", "ab")  # noqa: SIM115 (lives as long as the process)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.base / 'server.log'}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.base / 'server.log'}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str, timeout: float = 30, attempts: int = 5) -> Any:
        """GET + JSON; a connection the busy server resets is retried (reads are idempotent)."""
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                    return json.loads(r.read())
            except (ConnectionResetError, ConnectionRefusedError, urllib.error.URLError) as e:
                if isinstance(e, urllib.error.HTTPError) or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def post(self, path: str, payload: dict[str, Any], timeout: float = 30) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict[str, Any], client_id: str | None = None) -> tuple[int, Any]:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 600) -> dict[str, Any]:
        """Poll ``/history`` until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died; see {self.base / 'server.log'}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        code, body = self.queue(prompt)
        if code != 200:
            raise RuntimeError(f"ComfyUI refused the prompt ({code}): {json.dumps(body)[:2000]}")
        return self.wait(body["prompt_id"], timeout)


def saved_images(entry: dict[str, Any], output_dir: pathlib.Path) -> list[pathlib.Path]:
    """Files a finished prompt's SaveImage nodes wrote."""
    paths = []
    for out in entry.get("outputs", {}).values():
        for img in out.get("images", []):
            paths.append(output_dir / img.get("subfolder", "") / img["filename"])
    return paths
