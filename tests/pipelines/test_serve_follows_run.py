"""The query service over a run that a scheduled rerun changes while it serves: answers come
from the run as it is on disk, never name an image the rerun retired, and a layer whose
index still holds retired images answers 503 with the reason until the workflow updates it."""

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import write_dataset

from featscope.pipelines.app import report
from featscope.pipelines.app.serve import CHECK_EVERY, make_server
from featscope.pipelines.core import manifest
from featscope.pipelines.core.neighbours import neighbours_of, open_index
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours

K = 30  # more than the run has: every indexed image comes back


def fetch(url, data=None):
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def neighbour_ids(answer) -> list[int]:
    return [n["image_id"] for n in answer["neighbours"]]


@pytest.fixture
def served(tmp_path, digits):
    """(run, its images folder, the service's URL, the in-process server) over a small run."""
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0, 1, 7), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images, shard_size=4, model="resnet18", weights="random")
    extract.extract(rd, ["pool", "pixels"], batch_size=8, workers=0, progress=False)
    for layer in ("pool", "pixels"):
        neighbours.build(rd, layer, progress=False)
    report.build(rd, k=4, progress=False)
    server = make_server(rd, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield rd, images, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


@pytest.fixture
def served_run(served):
    return served[:3]


def test_a_rerun_under_a_running_service_is_followed_and_never_answers_with_retired_images(served_run, digits):
    rd, images, base = served_run
    before = {r["path"]: r["image_id"] for r in manifest.read(rd).to_pylist()}
    photo = next(i for p, i in before.items() if "/photo/" in p)
    gone_path = next(p for p in sorted(before) if "/7/" in p)
    gone = before[gone_path]
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k={K}")
    assert status == 200 and gone in neighbour_ids(answer) and answer["unindexed"] == 0
    status, answer, _ = fetch(f"{base}/api/explain?a={photo}&b={gone}&layer=pool")
    assert status == 200, answer

    # the rerun, as the workflow runs it: the manifest first (one image removed, one added) ...
    (images / gone_path.rsplit("/images/", 1)[1]).unlink()
    write_dataset(images / "new", digits, n_photos=0, labels=(3,), digits_per_label=1)
    manifest.run(rd, images)
    time.sleep(2 * CHECK_EVERY)
    status, answer, _ = fetch(f"{base}/api/image/{gone}")
    assert status == 404, answer  # the catalogue followed at once
    for layer in ("pool", "pixels"):  # the indexes still hold the retired image: a loud refusal, not its name
        status, answer, headers = fetch(f"{base}/api/neighbours?id={photo}&layer={layer}&k={K}")
        assert status == 503 and "retired" in answer["error"] and headers["Retry-After"], answer
    with open(next(p for p in before if "/photo/" in p), "rb") as f:
        upload = f.read()
    status, answer, _ = fetch(f"{base}/api/neighbours?layer=pool&k={K}", upload)
    assert status == 503, answer
    status, answer, _ = fetch(f"{base}/api/explain?a={photo}&b={gone}&layer=pool")
    assert status == 404, answer

    # ... then extraction of the new shard and the update of one index: that layer answers again,
    # exactly as an index opened afresh does, with the new image and without the retired one
    extract.extract(rd, ["pool", "pixels"], batch_size=8, workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    time.sleep(2 * CHECK_EVERY)
    new = next(r["image_id"] for r in manifest.read(rd).to_pylist() if "/new/" in r["path"])
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k={K}")
    fresh = neighbours_of(open_index(rd, "pool"), [photo], K).image_ids[0]
    assert status == 200 and neighbour_ids(answer) == [int(n) for n in fresh if n >= 0], answer
    assert gone not in neighbour_ids(answer) and new in neighbour_ids(answer)
    status, answer, _ = fetch(f"{base}/api/neighbours?id={new}&layer=pool&k=3")
    assert status == 200 and len(answer["neighbours"]) == 3
    status, answer, _ = fetch(f"{base}/api/explain?a={photo}&b={new}&layer=pool")
    assert status == 200 and {answer["a"], answer["b"]} == {photo, new}, answer  # the explainer's paths followed too
    status, answer, _ = fetch(f"{base}/api/neighbours?layer=pool&k={K}", upload)
    assert status == 200 and answer["neighbours"][0]["image_id"] == photo and gone not in neighbour_ids(answer)
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pixels&k={K}")
    assert status == 503, answer  # not updated yet
    neighbours.build(rd, "pixels", progress=False)
    time.sleep(2 * CHECK_EVERY)
    # the first request after this change is one whose handler runs on a worker thread: it reads the run itself
    status, answer, _ = fetch(f"{base}/api/explain?a={new}&b={photo}&layer=pool")
    assert status == 200 and answer["a"] == new, answer
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pixels&k={K}")
    assert status == 200 and gone not in neighbour_ids(answer) and new in neighbour_ids(answer)

    # a run that cannot be read at all (a damaged manifest) is a 503 with the reason, until repaired
    good = rd.manifest.read_bytes()
    damaged = rd.manifest.with_name("damaged.parquet")
    damaged.write_bytes(good[: len(good) // 2])
    damaged.replace(rd.manifest)
    time.sleep(2 * CHECK_EVERY)
    for _ in range(2):  # and stays one: the old state is never answered from again
        status, answer, headers = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k=3")
        assert status == 503 and "cannot be read now" in answer["error"] and headers["Retry-After"], answer
    rd.manifest.write_bytes(good)
    time.sleep(2 * CHECK_EVERY)
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k={K}")
    assert status == 200 and neighbour_ids(answer) == [int(n) for n in fresh if n >= 0]


def test_answers_say_how_many_new_images_their_index_does_not_hold_yet(served_run, digits):
    """Images added by a rerun are searched only once their layer's index holds them: until
    then each answer counts them (`unindexed`), instead of passing for the whole run's."""
    rd, images, base = served_run
    photo = next(r["image_id"] for r in manifest.read(rd).to_pylist() if "/photo/" in r["path"])
    write_dataset(images / "new", digits, n_photos=0, labels=(3,), digits_per_label=2)
    (images / "new" / "broken.png").write_text("not a picture")  # extraction records it: no index can hold it
    manifest.run(rd, images)
    time.sleep(2 * CHECK_EVERY)
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k={K}")
    assert status == 200 and answer["unindexed"] == 3, answer  # searched among the others, and says so
    new = [r["image_id"] for r in manifest.read(rd).to_pylist() if "/new/" in r["path"] and "broken" not in r["path"]]
    assert not set(new) & set(neighbour_ids(answer))
    status, answer, _ = fetch(f"{base}/api/neighbours?id={new[0]}&layer=pool&k=3")
    assert status == 404 and "not in the 'pool' index yet (added since it was last updated)" in answer["error"], answer
    extract.extract(rd, ["pool", "pixels"], batch_size=8, workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    time.sleep(2 * CHECK_EVERY)
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k={K}")
    assert status == 200 and answer["unindexed"] == 0 and set(new) <= set(neighbour_ids(answer)), answer
    broken = next(r["image_id"] for r in manifest.read(rd).to_pylist() if "broken" in r["path"])
    status, answer, _ = fetch(f"{base}/api/neighbours?id={broken}&layer=pool&k=3")  # why, from errors.parquet
    assert status == 404 and answer["error"] == (f"image {broken} has no pool features: not an image "
                                                 "(unrecognised file format) (errors.parquet)"), answer
    status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pixels&k={K}")
    assert status == 200 and answer["unindexed"] == 2, answer  # that layer's index is not updated yet


def test_an_upload_embedded_while_the_index_is_updated_is_searched_in_the_updated_one(served, digits):
    """The run may change while an upload waits for the model: its vector is then searched in
    the layer's index as it is after, and the answer names the images that index added."""
    rd, images, base, server = served
    photo = next(r for r in manifest.read(rd).to_pylist() if "/photo/" in r["path"])
    upload = open(photo["path"], "rb").read()
    assert fetch(f"{base}/api/neighbours?layer=pool&k={K}", upload)[0] == 200  # the model loads
    running, release = threading.Event(), threading.Event()

    def hold_once(*_):
        if not running.is_set():
            running.set()
            release.wait(60)

    hook = server.service.embedder.extractor.model.register_forward_pre_hook(hold_once)
    answers = []
    try:
        asking = threading.Thread(target=lambda: answers.append(fetch(f"{base}/api/neighbours?layer=pool&k={K}",
                                                                      upload)))
        asking.start()
        assert running.wait(60)  # the upload is in the model now: the workflow adds images and updates the index
        write_dataset(images / "new", digits, n_photos=0, labels=(3,), digits_per_label=2)
        manifest.run(rd, images)
        extract.extract(rd, ["pool"], batch_size=8, workers=0, progress=False)
        neighbours.build(rd, "pool", progress=False)
        time.sleep(2 * CHECK_EVERY)
    finally:
        release.set()
        hook.remove()
    asking.join(60)
    status, answer, _ = answers[0]
    new = {r["image_id"] for r in manifest.read(rd).to_pylist() if "/new/" in r["path"]}
    assert status == 200 and answer["unindexed"] == 0 and new <= set(neighbour_ids(answer)), answer
    assert answer["neighbours"][0]["image_id"] == photo["image_id"]


def test_answers_while_the_index_is_replaced_again_and_again_are_all_whole_and_right(served_run):
    """Concurrent GETs while the workflow saves the layer's index five times over (the same
    vectors: the answers must not change): every answer is 200 and the exact neighbours."""
    rd, _, base = served_run
    ids = manifest.read(rd)["image_id"].to_pylist()
    index = open_index(rd, "pool")
    expected = {i: [int(n) for n in neighbours_of(index, [i], 5).image_ids[0]] for i in ids}
    stop, wrong = threading.Event(), []

    def ask(offset: int) -> None:
        n = offset
        while not stop.is_set():
            i = ids[n % len(ids)]
            status, answer, _ = fetch(f"{base}/api/neighbours?id={i}&layer=pool&k=5")
            if status != 200 or neighbour_ids(answer) != expected[i]:
                wrong.append((i, status, answer))
            n += 1

    askers = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in askers:
        t.start()
    try:
        for _ in range(5):
            neighbours.build(rd, "pool", rebuild=True, progress=False)
            time.sleep(2 * CHECK_EVERY)
    finally:
        stop.set()
        for t in askers:
            t.join()
    assert not wrong, wrong[:3]
    assert len(list(rd.index_root.glob(".pool.*"))) == 1  # the versions replaced are gone, and still answered


def test_a_service_started_mid_rerun_comes_up_and_follows_it_to_the_end(served_run, tmp_path):
    """`featscope serve` (re)started after the manifest retired an image but before the
    indexes were updated: it starts, warns about each such layer, answers 503 there and
    everything else as usual, and answers the layer once the workflow updates its index."""
    rd, images, _ = served_run
    gone = next(r for r in manifest.read(rd).to_pylist() if "/7/" in r["path"])
    Path(gone["path"]).unlink()
    manifest.run(rd, images)
    photo = next(r["image_id"] for r in manifest.read(rd).to_pylist() if "/photo/" in r["path"])
    err = (tmp_path / "stderr.txt").open("w+")
    service = subprocess.Popen([sys.executable, "-m", "featscope.pipelines.app.cli", "serve", "--run", str(rd.root),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = service.stdout.readline()
        assert line.startswith("serving "), (line, err.seek(0), err.read())
        base = re.search(r"at (http://\S+?)/ ", line).group(1)
        status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k=3")
        assert status == 503 and "retired" in answer["error"], answer
        status, answer, _ = fetch(f"{base}/api/image/{photo}")
        assert status == 200 and answer["image_id"] == photo
        err.seek(0)
        warnings = err.read()
        assert all(f"warning: layer '{layer}' answers 503" in warnings for layer in ("pool", "pixels")), warnings
        assert "warning: the report was built before the dataset last changed" in warnings, warnings
        neighbours.build(rd, "pool", progress=False)
        time.sleep(2 * CHECK_EVERY)
        status, answer, _ = fetch(f"{base}/api/neighbours?id={photo}&layer=pool&k={K}")
        assert status == 200 and gone["image_id"] not in neighbour_ids(answer), answer
    finally:
        service.terminate()
        service.wait(timeout=30)
