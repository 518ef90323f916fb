"""Load VAE (xDiT) with ``parallel_devices``: tiles spread over CPU slots give ComfyUI's own tiled decode /
encode exactly (max abs diff 0: the same per-tile math on devices of one type); small images and one
device are the stock VAE exactly. Tiny VAEs: TAESD layout (tiny_models) and a small SD-layout
AutoencoderKL (testing.tiny_vae)."""

from __future__ import annotations

import copy
import logging
import os

import pytest

pytestmark = pytest.mark.comfy


@pytest.fixture(autouse=True)
def as_comfy_runs_nodes():
    """Inference mode, as ComfyUI's executor runs every node (the stock tiled encode needs it); and one
    intra-op thread per torch call: this CPU host is shared, it keeps the serial references fast."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vaes(tiny_models):
    import comfy.sd
    import comfy.utils

    from xdit_multigpu.testing.tiny_vae import tiny_kl_vae

    taesd = comfy.sd.VAE(sd=comfy.utils.load_torch_file(tiny_models["vae16"].path))
    return {"kl": tiny_kl_vae(), "taesd": taesd}


def _par(vae, slots: int = 2, tile_pixels: int = 0, max_batch: int = 1):
    from xdit_multigpu.config import VAEParallelConfig
    from xdit_multigpu.engine.vae import parallelize

    cfg = VAEParallelConfig(devices=("cpu",) * slots, tile_pixels=tile_pixels, max_batch=max_batch)
    return parallelize(vae, cfg)


def _latent(vae, batch: int, h: int, w: int, seed: int = 0):
    import torch

    return torch.randn(batch, vae.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


def _image(batch: int, h: int, w: int, seed: int = 1):
    import torch

    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "slots", "batch"), [("kl", 2, 2), ("kl", 3, 1), ("taesd", 2, 1)])
def test_parallel_tiled_decode_equals_comfy_tiled_decode(vaes, kind, slots, batch, caplog):
    """Odd latent (21x27), several tiles in each of ComfyUI's three passes: identical to the serial tiler."""
    import torch

    vae = vaes[kind]
    lat = _latent(vae, batch, 21, 27)
    ref = vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    with caplog.at_level(logging.INFO, logger="xdit_multigpu"):
        out = _par(vae, slots).decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    assert ref.shape == (batch, 168, 216, 3) and torch.isfinite(ref).all() and ref.std() > 0.05
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert f"tiles over {slots} CPU slots" in caplog.text


def test_batched_tiles_equal_within_rounding(vaes):
    """``XDIT_VAE_TILE_BATCH`` > 1: tiles of one shape decoded together; per-sample math, so equal up to the
    last bits a kernel may change for another batch size (fp32: max abs <= 1e-5)."""
    vae = vaes["kl"]
    lat = _latent(vae, 1, 21, 27)
    ref = vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    out = _par(vae, 2, max_batch=4).decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    assert (out - ref).abs().max() <= 1e-5


def test_image_within_one_tile_and_batch(vaes):
    """ComfyUI's tiler decodes an input that fits one tile whole (another code path in its blending)."""
    import torch

    vae = vaes["kl"]
    lat = _latent(vae, 2, 6, 7)
    assert torch.equal(_par(vae, 2).decode_tiled(lat, tile_x=8, tile_y=8, overlap=2),
                       vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2))


@pytest.mark.parametrize("kind", ["kl", "taesd"])
def test_parallel_tiled_encode_equals_comfy_tiled_encode(vaes, kind):
    """Odd image (150x206, which ComfyUI crops to 144x200), 64-px tiles with 16-px overlap."""
    import torch

    vae = vaes[kind]
    img = _image(1, 150, 206)
    ref = vae.encode_tiled(img, tile_x=64, tile_y=64, overlap=16)
    out = _par(vae, 2).encode_tiled(img, tile_x=64, tile_y=64, overlap=16)
    assert ref.shape == (1, vae.latent_channels, 18, 25) and ref.std() > 0.01
    assert torch.equal(out, ref), (out - ref).abs().max()


def test_misordered_tiles_differ(vaes, monkeypatch):
    """Negative control: the same tiles with two of them swapped on replay do not give ComfyUI's result."""
    from xdit_multigpu.parallel import tiles

    vae = vaes["kl"]
    lat = _latent(vae, 1, 21, 27)
    ref = vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    original = tiles.TilePool.result
    swap = {0: 1, 1: 0}  # the first two tiles of the first pass: same shape, neighbours
    monkeypatch.setattr(tiles.TilePool, "result", lambda self, i, t: original(self, swap.get(i, i), t))
    out = _par(vae).decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    assert (out - ref).abs().max() > 1e-2


def test_rehearsal_decodes_nothing_and_shows_no_progress(vaes, monkeypatch):
    """Each tile is decoded once (the rehearsal only records), and the progress bar moves only with real
    tiles: as many updates as ComfyUI's own tiled decode makes."""
    import comfy.utils

    vae = vaes["kl"]
    lat = _latent(vae, 1, 21, 27)
    calls: list[int] = []
    updates: list[tuple[int, int]] = []
    inner = vae.first_stage_model.decode
    monkeypatch.setattr(vae.first_stage_model, "decode", lambda x, **kw: calls.append(1) or inner(x, **kw),
                        raising=False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: updates.append((v, t)))
    vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    stock_calls, stock_updates = len(calls), list(updates)
    calls.clear(), updates.clear()
    _par(vae, 3).decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    assert stock_calls > 12 and len(calls) == stock_calls
    assert updates == stock_updates


def test_plain_decode_and_encode_over_the_threshold_are_comfy_default_tiled(vaes):
    """Over ``tile_pixels``: VAE Decode == decode_tiled() with ComfyUI's defaults (64x64 latent tiles,
    overlap 16: several tiles at 72x40), as the stock VAE's out-of-memory fallback; under it: stock decode."""
    import torch

    vae = vaes["kl"]
    lat = _latent(vae, 1, 72, 40)  # 576x320 = 184320 pixels
    big = _par(vae, 2, tile_pixels=100_000)
    out = big.decode(lat)
    assert torch.equal(out, vae.decode_tiled(lat))
    plain = vae.decode(lat)
    assert (out - plain).abs().max() > 1e-3  # tiling is visible: the check above can fail
    assert torch.equal(_par(vae, 2, tile_pixels=200_000).decode(lat), plain)
    img = _image(1, 576, 320)
    assert torch.equal(big.encode(img), vae.encode_tiled(img))
    assert torch.equal(_par(vae, 2, tile_pixels=200_000).encode(img), vae.encode(img))


def test_device_copies_made_once_released_on_free_and_vae_copyable(vaes):
    import torch

    from xdit_multigpu.engine import lifecycle

    vae = vaes["kl"]
    par = _par(vae, 3)
    lat = _latent(vae, 1, 21, 27)
    ref = par.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    reps = dict(par._xdit_replicas._by_slot)
    assert sorted(reps) == [1, 2]  # slot 0 is the VAE's own device: ComfyUI's model itself
    par.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2)
    assert all(par._xdit_replicas._by_slot[k] is reps[k] for k in reps)  # made once
    lifecycle.release_pools()  # what POST /free runs
    assert par._xdit_replicas._by_slot == {}
    twin = copy.deepcopy(par)
    assert torch.equal(twin.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2), ref)


# --- through the node classes ---------------------------------------------------------------------------


def test_node_parallel_vae_with_stock_tiled_nodes(tiny_models):
    import nodes
    import torch

    from xdit_multigpu.engine.vae import XDiTVAE
    from xdit_multigpu.nodes.encoders import XDiTVAELoader

    name = os.path.basename(tiny_models["vae16"].path)
    (stock,) = nodes.VAELoader().load_vae(name)
    out = XDiTVAELoader().load(name, "default", "cpu:2")
    (ours,) = out["result"]
    assert isinstance(ours, XDiTVAE) and "2 CPU slots" in out["ui"]["text"][0]
    lat = {"samples": _latent(stock, 1, 21, 27)}
    args = dict(tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8)
    (a,) = nodes.VAEDecodeTiled().decode(stock, lat, **args)
    (b,) = nodes.VAEDecodeTiled().decode(ours, lat, **args)
    assert torch.equal(a, b)
    (c,) = nodes.VAEDecode().decode(stock, lat)  # small: the stock path
    (d,) = nodes.VAEDecode().decode(ours, lat)
    assert torch.equal(c, d)
    img = _image(1, 150, 206)
    (e,) = nodes.VAEEncodeTiled().encode(stock, img, 64, 16)
    (f,) = nodes.VAEEncodeTiled().encode(ours, img, 64, 16)
    assert torch.equal(e["samples"], f["samples"])


def test_node_one_device_is_the_stock_vae(tiny_models):
    import comfy.sd
    import nodes
    import torch

    from xdit_multigpu.nodes.encoders import XDiTVAELoader

    name = os.path.basename(tiny_models["vae16"].path)
    lat = {"samples": _latent(nodes.VAELoader().load_vae(name)[0], 1, 16, 16)}
    (stock,) = nodes.VAEDecode().decode(nodes.VAELoader().load_vae(name)[0], lat)
    for devices in ("", "cpu:1", "cpu"):
        (vae,) = XDiTVAELoader().load(name, "cpu", devices)["result"]
        assert type(vae) is comfy.sd.VAE
        assert torch.equal(nodes.VAEDecode().decode(vae, lat)[0], stock)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0,0", "lists GPU 0 more than once"),
        ("a,b", "is malformed"),
        ("3", "GPU 3 is out of range"),
        ("cpu:0", "asks for 0 CPU ranks"),
        ("all", '"all" finds no CUDA GPU'),
    ],
)
def test_node_validation_names_the_field(comfy_root, text, problem):
    from xdit_multigpu.nodes.encoders import XDiTVAELoader

    msg = XDiTVAELoader.VALIDATE_INPUTS("default", text)
    assert isinstance(msg, str) and msg.startswith("parallel_devices: ") and problem in msg
    assert XDiTVAELoader.VALIDATE_INPUTS("default", "cpu:2") is True
    assert XDiTVAELoader.VALIDATE_INPUTS("default") is True


def test_bench_runs_tiny_on_cpu_slots(comfy_root, tmp_path):
    """``python -m xdit_multigpu.bench.vae --tiny`` (the GPU bench's code path on 2 CPU slots) cannot rot."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, COMFYUI_PATH=comfy_root, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "xdit_multigpu.bench.vae", "--out", str(tmp_path), "--tiny", "--size", "128",
           "--slots", "1", "2", "--repeats", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads((tmp_path / "vae.json").read_text())
    assert report["tiles"] > 3 and [len(run["devices"]) for run in report["runs"]] == [1, 2, 2]
    assert [run["blend"] for run in report["runs"]] == ["host (stock)", "host", "device"]
    assert all(run["equal"] and run["max_abs"] == 0 for run in report["runs"])
