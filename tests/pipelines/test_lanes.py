"""Lanes: image-optimisation chunks run at once, each lane on its own copy of the model and
its share of the cores, giving exactly the images of one lane at the same thread count."""

import threading

import pytest
import torch

from featscope.pipelines.core import lanes
from featscope.pipelines.core.models import load_model
from featscope.pipelines.stages import units


@pytest.mark.parametrize("cpus, items, batch, expected", [
    (2, 8, 8, (2, 1, 4)),  # two 1-thread lanes of 4: 8 images in flight, as --batch 8 asks
    (2, 64, 16, (2, 1, 4)),  # at most CPU_CHUNK a lane: a larger batch's activations leave the cache
    (2, 3, 16, (2, 1, 2)),  # every lane gets work
    (2, 1, 16, (1, 2, 16)),  # one item: one lane on every core
    (16, 64, 16, (8, 2, 2)),  # at most MAX_LOCAL_WORKERS lanes, the cores shared among them
    (4, 64, 2, (2, 2, 1)),  # never more lanes than the batch
])
def test_lane_plan_shares_the_cores_and_keeps_up_to_the_batch_in_flight(monkeypatch, cpus, items, batch, expected):
    monkeypatch.setattr(lanes, "usable_cpus", lambda: cpus)
    assert lanes.lane_plan(items, batch, torch.device("cpu")) == expected
    assert lanes.lane_plan(items, batch, torch.device("cuda"))[::2] == (1, batch)  # a GPU: one lane, whole batches


def test_map_in_lanes_keeps_order_and_gives_each_lane_its_own_state_and_threads():
    made, used = [], set()

    def make_state():
        made.append(threading.get_ident())
        return len(made)  # a lane's model, made on the calling thread before any lane runs

    def run(state, chunk):
        used.add((state, threading.get_ident(), torch.get_num_threads()))
        threading.Event().wait(0.01)  # so that both lanes take chunks
        return [c * 10 for c in chunk]

    before = torch.get_num_threads()
    out = list(lanes.map_in_lanes(run, lanes.chunks_of(list(range(10)), 3), make_state, lanes=2, threads=1))
    assert out == [[0, 10, 20], [30, 40, 50], [60, 70, 80], [90]]
    assert made == [threading.get_ident()] * 2
    states, threads = {u[0] for u in used}, {u[1] for u in used}
    assert states == {1, 2} and len(threads) == len(used) == 2 and {u[2] for u in used} == {1}  # one each
    assert torch.get_num_threads() == before  # the caller's own setting is left alone
    assert list(lanes.map_in_lanes(run, [[1]], make_state, lanes=2, threads=1)) == [[10]] and len(made) == 3


def test_rendering_on_two_lanes_gives_the_images_of_one_lane(monkeypatch):
    loaded = load_model("resnet18", "random")
    spec = loaded.layer("layer3")
    options = units.RenderOptions(layer="layer3", size=32, steps=3, batch=4)
    cpu = torch.device("cpu")
    monkeypatch.setattr(lanes, "usable_cpus", lambda: 2)
    assert lanes.lane_plan(5, 4, cpu) == (2, 1, 2)
    split = list(units.render_units(loaded, spec, cpu, [0, 3, 5, 7, 9], options))
    assert [chosen for chosen, *_ in split] == [[0, 3], [5, 7], [9]]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the lanes' thread count, on one lane: the calling thread
    try:
        monkeypatch.setattr(units, "lane_plan", lambda items, batch, device: (1, 1, items))  # one chunk
        ((chosen, images, trajectory, measured),) = units.render_units(loaded, spec, cpu, [0, 3, 5, 7, 9], options)
    finally:
        torch.set_num_threads(before)
    assert chosen == [0, 3, 5, 7, 9]
    torch.testing.assert_close(torch.cat([part[1] for part in split]), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([part[2] for part in split], 1), trajectory, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([part[3] for part in split]), measured, atol=1e-4, rtol=1e-4)
