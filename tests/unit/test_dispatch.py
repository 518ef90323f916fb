"""The group dispatcher with fake pools: batch cuts per policy, order of results, single-image picks,
a failing group taken out and its work re-dispatched, fallback only when every group is out."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from xdit_multigpu.config import DeviceSet, DispatcherSpec, LoaderKind, LoadSpec, SchedulingStrategy
from xdit_multigpu.engine.engine import Engine
from xdit_multigpu.engine.pool import Timeouts
from xdit_multigpu.engine.request import BatchSlice, SampleRequest
from xdit_multigpu.errors import ConfigError, WorkerError
from xdit_multigpu.models import lookup

pytestmark = pytest.mark.unit
SD3 = lookup("SD3")
T = Timeouts(start_s=5, sample_s=5, collective_s=5, health_s=1)


class Pool:
    """Returns ``noise * 10 + group`` per item so the test sees which group did which item."""

    def __init__(self, spec, world, delay, fail):
        self.key, self.fast_link_group = spec.pool_key(), None
        self.group = world.index(spec.devices.ids[0]) // max(1, len(spec.devices.ids))
        self.delay, self.fail, self.calls = delay, fail, []

    def sample(self, req, timeout, on_progress=None):
        self.calls.append(req)
        if self.fail.get(self.group):
            self.fail[self.group] -= 1
            raise WorkerError(f"rank 0 of group {self.group} died")
        time.sleep(self.delay.get(self.group, 0.0) * req.noise.shape[0])
        return req.noise * 10 + self.group

    def check_health(self, timeout):
        pass

    def shutdown(self):
        pass


class Factory:
    def __init__(self, ids, delay=None, fail=None, start_fail=None):
        self.ids, self.delay, self.fail, self.start_fail = list(ids), delay or {}, fail or {}, start_fail or {}
        self.pools, self.lock = [], threading.Lock()

    def __call__(self, spec, timeouts):
        pool = Pool(spec, self.ids, self.delay, self.fail)
        if self.start_fail.get(pool.group):
            self.start_fail[pool.group] -= 1
            raise WorkerError(f"group {pool.group} did not start")
        with self.lock:
            self.pools.append(pool)
        return pool


def spec(text="0,1|2,3", scheduling=SchedulingStrategy.ROUND_ROBIN, group_size=0, weights=()):
    return DispatcherSpec(LoadSpec(LoaderKind.DIFFUSION_MODEL, "/m/a.safetensors"), DeviceSet.parse(text, 8),
                          scheduling=scheduling, group_size=group_size, group_weights=weights)


def req(batch, cond_batch=1):
    noise = torch.arange(batch, dtype=torch.float32).reshape(batch, 1, 1, 1).expand(batch, 16, 2, 2).contiguous()
    cond = [[torch.zeros(cond_batch, 4, 8), {"pooled_output": torch.zeros(cond_batch, 8)}]]
    return SampleRequest(noise, torch.zeros_like(noise), cond, cond, 1, 2, 3.0, "euler", "simple")


def groups_of(latent):
    """Which group made each item (the fake pool adds the group index)."""
    return [int(round(float(x))) for x in (latent[:, 0, 0, 0] - torch.arange(latent.shape[0]) * 10)]


def run(sp, r, factory, cfg_active=True):
    eng = Engine(T, factory)
    return eng, eng.sample(sp, r, SD3, 24, cfg_active, "MODEL")


def test_round_robin_cuts_a_batch_evenly_and_keeps_item_order():
    f = Factory([0, 1, 2, 3])
    _, out = run(spec(), req(5), f)
    assert groups_of(out.latent) == [0, 0, 0, 1, 1]
    assert out.fallback_reason is None and "batch 5 over 2 groups by round_robin" in out.groups
    sliced = [c.batch for p in f.pools for c in p.calls]
    assert sorted(sliced, key=lambda b: b.start) == [BatchSlice(0, 3, 5), BatchSlice(3, 5, 5)]


def test_weighted_round_robin_uses_the_user_weights():
    _, out = run(spec(scheduling=SchedulingStrategy.WEIGHTED_ROUND_ROBIN, weights=(3.0, 1.0)), req(8), Factory([0, 1, 2, 3]))
    assert groups_of(out.latent) == [0] * 6 + [1] * 2


def test_gpus_per_group_forms_groups_from_a_flat_list():
    f = Factory([0, 1, 2, 3, 4, 5])
    _, out = run(spec("0,1,2,3,4,5", group_size=2), req(6), f)
    assert groups_of(out.latent) == [0, 0, 1, 1, 2, 2]
    assert sorted(p.key[1].ids for p in f.pools) == [(0, 1), (2, 3), (4, 5)]


def test_least_loaded_hands_out_items_to_whichever_group_is_free():
    f = Factory([0, 1, 2, 3], delay={0: 0.02, 1: 0.6})
    _, out = run(spec(scheduling=SchedulingStrategy.LEAST_LOADED), req(6), f)
    made = groups_of(out.latent)
    assert made.count(0) >= 4 and made.count(1) >= 1, made  # the slow group takes fewer items


def test_adaptive_learns_then_cuts_by_measured_speed():
    f = Factory([0, 1, 2, 3], delay={0: 0.02, 1: 0.06})
    eng = Engine(T, f)
    sp = spec(scheduling=SchedulingStrategy.ADAPTIVE)
    first = eng.sample(sp, req(8), SD3, 24, True, "MODEL")
    assert groups_of(first.latent).count(0) > groups_of(first.latent).count(1)  # dynamic: fast group did more
    second = eng.sample(sp, req(8), SD3, 24, True, "MODEL")
    made = groups_of(second.latent)
    assert made == sorted(made) and made.count(0) in (5, 6, 7), made  # up-front cut ~3:1 by measured speed


def test_single_images_alternate_under_round_robin_and_say_where():
    eng = Engine(T, Factory([0, 1, 2, 3]))
    picks = [groups_of(eng.sample(spec(), req(1), SD3, 24, True, "MODEL").latent)[0] for _ in range(4)]
    assert picks == [0, 1, 0, 1]
    out = eng.sample(spec(), req(1), SD3, 24, True, "MODEL")
    assert "round_robin -> group 0 (GPU 0,1)" in out.groups


def test_conditioning_with_its_own_batch_keeps_the_batch_whole():
    _, out = run(spec(), req(4, cond_batch=4), Factory([0, 1, 2, 3]))
    assert len(set(groups_of(out.latent))) == 1 and "batch kept whole" in out.groups


def test_a_failing_group_is_taken_out_and_its_items_redispatched():
    f = Factory([0, 1, 2, 3], fail={1: 1})
    eng, out = run(spec(), req(4), f)
    assert out.fallback_reason is None
    assert groups_of(out.latent) == [0, 0, 0, 0]  # group 1's slice went to group 0
    assert "group 1 (GPU 2,3) failed and is being rebuilt" in out.groups
    deadline = time.monotonic() + 5
    disp = next(iter(eng.dispatchers.values()))
    while not disp.groups[1].up and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disp.groups[1].up  # rebuilt in the background
    assert groups_of(eng.sample(spec(), req(4), SD3, 24, True, "MODEL").latent) == [0, 0, 1, 1]


def test_every_group_out_falls_back_to_one_device(monkeypatch):
    from xdit_multigpu.executor import local

    class W:
        def sample(self, r, progress=None):
            return r.noise * 0 - 1

    monkeypatch.setattr(local.LocalExecutor, "for_patcher", classmethod(lambda cls, p: cls(W())))
    _, out = run(spec(), req(2), Factory([0, 1, 2, 3], start_fail={0: 9, 1: 9}))
    assert out.fallback_reason and "every GPU group failed" in out.fallback_reason
    assert float(out.latent.max()) == -1.0


@pytest.mark.parametrize(("text", "size", "weights", "field"), [
    ("0,1,2", 2, (), "gpus_per_group"),
    ("0,1|2,3", 2, (), "gpus_per_group"),
    ("0,1|2,3", 0, (1.0,), "group_weights"),
    ("0,1|2,3", 0, (1.0, -1.0), "group_weights"),
])
def test_bad_groups_are_config_errors_before_any_pool(text, size, weights, field):
    f = Factory([0, 1, 2, 3])
    with pytest.raises(ConfigError, match=field):
        run(spec(text, group_size=size, weights=weights), req(2), f)
    assert not f.pools


@pytest.mark.parametrize(("text", "msg"), [("0,1|1,2", "more than one group"), ("0,1|cpu:2", "mixes"), ("all|0", "mixes")])
def test_bad_explicit_groups(text, msg):
    with pytest.raises(ConfigError, match=msg):
        DeviceSet.parse(text, 4)


def test_explicit_cpu_groups_number_their_slots():
    d = DeviceSet.parse("cpu:2|cpu:1", 0)
    assert d.ids == (0, 1, 2) and d.groups == ((0, 1), (2,))
