"""A real ComfyUI server with Load VAE (xDiT) ``parallel_devices: cpu:2`` feeding the stock VAE Encode (Tiled),
VAE Decode (Tiled) and VAE Decode nodes: the saved images equal the stock workflow's (the same prompt with the
stock Load VAE) pixel for pixel, the log names the parallel path, and a bad ``parallel_devices`` is a node
error."""

from __future__ import annotations

import copy
import pathlib

import numpy as np
import pytest

from tests.conftest import COMFYUI_PATH, REPO

pytestmark = pytest.mark.comfy

INPUT = "xdit_vae_input.png"


@pytest.fixture(scope="module")
def server():
    from PIL import Image

    from xdit_multigpu.testing.server import ComfyServer, prepare_base_dir
    from xdit_multigpu.testing.tiny_models import write_tiny_models

    base = prepare_base_dir(REPO / ".host" / "test-server-vae")
    tiny = write_tiny_models(str(base / "models"), families=["vae16"], comfy_root=COMFYUI_PATH)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 206, 3), dtype=np.uint8)).save(base / "input" / INPUT)
    srv = ComfyServer(pathlib.Path(COMFYUI_PATH), base, extra_args=["--output-directory", str(base / "output")])
    srv.start()
    srv.vae_name = pathlib.Path(tiny["vae16"].path).name
    yield srv
    srv.stop()


def _prompt(server, parallel_devices: str) -> dict:
    tiles = {"tile_size": 128, "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}
    return {
        "1": {"class_type": "XDiTVAELoader",
              "inputs": {"vae_name": server.vae_name, "device": "cpu", "parallel_devices": parallel_devices}},
        "2": {"class_type": "LoadImage", "inputs": {"image": INPUT}},
        "3": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["2", 0], "vae": ["1", 0], **tiles}},
        "4": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 0], **tiles}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "xdit_vae_tiled"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "xdit_vae_plain"}},
    }


def _images(entry, server) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for node in ("5", "7"):
        (img,) = entry["outputs"][node]["images"]
        out[node] = np.asarray(Image.open(server.base / "output" / img.get("subfolder", "") / img["filename"]))
    return out


def test_parallel_vae_workflow_equals_stock_workflow(server):
    from xdit_multigpu.testing.workflow import stock_equivalent

    prompt = _prompt(server, "cpu:2")
    log = server.base / "server.log"
    seen = log.read_text(errors="replace") if log.exists() else ""
    ours = server.run(copy.deepcopy(prompt), timeout=600)
    assert ours["status"]["status_str"] == "success", ours["status"]
    stock = server.run(stock_equivalent(prompt), timeout=600)
    assert stock["status"]["status_str"] == "success", stock["status"]
    a, b = _images(ours, server), _images(stock, server)
    assert a["5"].shape == b["5"].shape == (144, 200, 3)
    assert np.array_equal(a["5"], b["5"]) and np.array_equal(a["7"], b["7"])
    assert not np.array_equal(a["5"], a["7"])  # tiled and whole decodes differ: the tiled path ran
    new = log.read_text(errors="replace")[len(seen):]
    assert "VAE encode (1, 3, 144, 200), tiles 128x128 overlap 32" in new and "tiles over 2 CPU slots" in new
    assert "VAE decode (1, 16, 18, 25), tiles 16x16 overlap 4" in new
    assert "2 CPU slots" in ours["outputs"]["1"]["text"][0]  # the loader's status on the node


def test_bad_parallel_devices_is_a_node_error(server):
    code, body = server.queue(_prompt(server, "0,0"))
    assert code == 400
    details = " ".join(e["details"] for e in body["node_errors"]["1"]["errors"])
    assert 'parallel_devices: "0,0" lists GPU 0 more than once' in details, details
