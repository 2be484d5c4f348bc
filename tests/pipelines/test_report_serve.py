"""The report's data files, and the query service over real HTTP: answers, and refusals."""

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script, six_digit_reported_run

from featscope.pipelines.app import report
from featscope.pipelines.app.report import SHARD
from featscope.pipelines.app.report_pictures import KeptPictures
from featscope.pipelines.app.serve import DynamicBatcher, make_server, search_batch
from featscope.pipelines.core import manifest
from featscope.pipelines.core.neighbours import neighbours_of
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import read_predictions
from featscope.pipelines.stages import index as neighbours


def test_report_holds_every_image_with_its_exact_neighbours(reported_run):
    rd = reported_run
    rows = manifest.read(rd).to_pylist()
    index = neighbours.open_index(rd, "pool")
    for row in rows:
        i = row["image_id"]
        assert rd.thumbnail(i).exists()
        entry = load_script(rd.report_dir / "data" / f"images-{i // SHARD:04d}.js")[str(i)]
        expected = [int(n) for n in index.search_ids([i], k=5).image_ids[0] if n != i][:4]
        assert [n for n, _ in entry["neighbours"]["pool"]] == expected
        assert set(entry["neighbours"]) == {"pool", "pixels"}
        assert entry["saliency"] == (["gradcam"] if row["label"] == "photo" else [])
        best = read_predictions(rd)[i][:3]  # the model's top classes, by number (random weights)
        assert entry["prediction"] == [[f"class {c}", pytest.approx(p, abs=1e-3)] for c, p in best]
    run = load_script(rd.report_dir / "data" / "run.js")
    assert run["images"] == len(rows) and [m["layer"] for m in run["mosaics"]] == ["pool"]
    assert run["topk"][0]["name"] == "layer3" and run["topk"][0]["rendered"] == [0, 1, 2, 3]
    assert "viz" not in json.dumps(run["toolbox"])  # no toolbox in this run: the part is absent, not broken
    assert [h["status"] for h in run["history"]] == ["ok"] and run["history"][0]["images"] == len(rows)
    built = datetime.strptime(run["built"], "%Y-%m-%d %H:%M:%S %z").timestamp()  # shown: the report is as of then
    assert abs(built - (rd.report_dir / "data" / "run.js").stat().st_mtime) < 120


def test_a_report_built_while_an_image_could_not_be_read_is_named_until_built_again(reported_run):
    """The grey square of an image that could not be read was replaced by the next report, but
    a dataset that did not change never got one, and nothing said the report held it."""
    from pathlib import Path

    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.rundir import UNREADABLE_AT, read_record

    rd = reported_run
    row = manifest.read(rd).to_pylist()[0]
    rd.thumbnail(row["image_id"]).unlink()  # its thumbnail is made again, while the image is away
    kept = Path(row["path"]).read_bytes()
    Path(row["path"]).unlink()
    report.build(rd, k=4, progress=False)
    record = read_record(rd.report_unreadable)
    assert record["ids"] == [row["image_id"]] and record[UNREADABLE_AT]  # the workflow's report rule reruns
    now = status(rd)
    assert "report" in now.stale and any(line.startswith("report: current; 1 image shown as a grey square")
                                         for line in now.lines)
    Path(row["path"]).write_bytes(kept)
    assert report.build(rd, k=4, progress=False).thumbnails_made == 1
    assert read_record(rd.report_unreadable) == {"ids": [], UNREADABLE_AT: record[UNREADABLE_AT]}  # then rests
    assert "report" not in status(rd).stale


def test_a_rerun_rewrites_only_the_data_files_that_change(reported_run):
    rd = reported_run
    stamps = {p: p.stat().st_mtime_ns for p in (rd.report_dir / "data").glob("images-*.js")}
    again = report.build(rd, k=4, progress=False)
    assert again.chunks_written == 0 and again.chunks == len(stamps) and again.thumbnails_made == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "0 of" in again.line()


def test_toolbox_pictures_are_grouped_under_headings_with_captions(tmp_path):
    rd = RunDir(tmp_path / "run")
    for name in ("filters/block0", "activations/block13/5002", "adversarial/135-untargeted", "adversarial/5002-309",
                 "adversarial/5002-309-adv", "class-models", "class-models/130", "style/5002-ihc",
                 "style/switch-skimage-chelsea", "dream/5010", "texture/brick"):
        path = rd.viz_dir / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    groups = {g["heading"]: [(i["caption"], i.get("image")) for i in g["items"]]
              for g in report._toolbox(rd, live={135, 5002, 5010}, pictures=KeptPictures(rd))}
    assert list(groups) == ["Filters", "Activations", "Class models", "Adversarial examples", "DeepDream",
                            "Texture synthesis", "Style transfer"]
    assert groups["Adversarial examples"] == [("image 135, untargeted", 135), ("image 5002, target class 309", 5002)]
    assert groups["Activations"] == [("layer block13, image 5002", 5002)]
    assert groups["Style transfer"] == [("image 5002 in the style of ihc", 5002),
                                        ("style switching and mixing: skimage-chelsea", None)]
    assert groups["Class models"] == [("", None)]  # the gallery only, not each class's picture
    left = {g["heading"]: [i.get("image") for i in g["items"]]
            for g in report._toolbox(rd, live={135, 5010}, pictures=KeptPictures(rd))}
    assert left["Adversarial examples"] == [135] and "Activations" not in left  # 5002 left the dataset
    assert left["Style transfer"] == [None]


def test_toolbox_pictures_of_images_that_left_the_dataset_are_named_and_not_shown(tmp_path, digits):
    """A picture of an image retired since it was drawn stayed in the report's gallery, with a
    link to an image page that no longer exists; the workflow never draws it again."""
    from featscope.pipelines.app.status import status
    from featscope.pipelines.stages import viz

    rd = six_digit_reported_run(tmp_path, digits)
    rows = manifest.read(rd).to_pylist()
    leaving, staying = rows[0], rows[1]
    viz.activations(rd, ["layer1"], [leaving["image_id"], staying["image_id"]])
    report.build(rd, k=2, progress=False)
    shown = [i["image"] for g in load_script(rd.report_dir / "data" / "run.js")["toolbox"] for i in g["items"]]
    assert shown == [leaving["image_id"], staying["image_id"]]
    assert not any(line.startswith("viz:") for line in status(rd).lines)
    Path(leaving["path"]).unlink()
    manifest.run(rd, tmp_path / "images")
    assert f"viz: 1 picture of 1 image that left the dataset (ids {leaving['image_id']})" in status(rd).line()
    report.build(rd, k=2, progress=False)
    shown = [i["image"] for g in load_script(rd.report_dir / "data" / "run.js")["toolbox"] for i in g["items"]]
    assert shown == [staying["image_id"]]


@pytest.fixture(scope="module")
def server(reported_run):
    server = make_server(reported_run, port=0, max_upload=200_000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", reported_run
    server.shutdown()
    server.server_close()


def fetch(url, data=None):
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_service_answers_by_id_and_by_upload(server):
    base, rd = server
    rows = manifest.read(rd).to_pylist()
    photo = next(r for r in rows if r["label"] == "photo")
    status, body = fetch(f"{base}/api/neighbours?id={photo['image_id']}&layer=pool&k=3")
    expected = [int(n) for n in neighbours.open_index(rd, "pool").search_ids([photo["image_id"]], k=4).image_ids[0]
                if n != photo["image_id"]][:3]
    assert status == 200 and [n["image_id"] for n in json.loads(body)["neighbours"]] == expected
    with open(photo["path"], "rb") as f:
        status, body = fetch(f"{base}/api/neighbours?layer=pool&k=3", f.read())
    answer = json.loads(body)
    assert status == 200 and answer["neighbours"][0]["image_id"] == photo["image_id"], answer  # itself, distance ~0
    assert answer["neighbours"][0]["distance"] < 1e-3
    status, body = fetch(f"{base}/api/image/{photo['image_id']}")
    assert status == 200 and json.loads(body)["label"] == "photo"
    status, body = fetch(f"{base}/report/index.html")
    assert status == 200 and b"FS.index()" in body


def test_an_upload_the_model_computes_nan_for_is_refused_not_ranked(server, monkeypatch):
    """A NaN vector (fp16 overflow) used to be searched: faiss ranks NaN distances anywhere."""
    from featscope.pipelines.core.features import ImageEmbedder

    base, rd = server
    photo = next(r for r in manifest.read(rd).to_pylist() if r["label"] == "photo")
    upload = open(photo["path"], "rb").read()
    real = ImageEmbedder.embed_batch
    monkeypatch.setattr(ImageEmbedder, "embed_batch",
                        lambda self, inputs: {k: v * np.nan for k, v in real(self, inputs).items()})
    status, body = fetch(f"{base}/api/neighbours?layer=pool&k=3", upload)
    assert status == 422 and json.loads(body)["error"] == (
        "the model's pool features of this image are not finite numbers (NaN or inf): it cannot be compared with "
        "the run's images")
    monkeypatch.setattr(ImageEmbedder, "embed_batch", real)
    status, body = fetch(f"{base}/api/neighbours?layer=pool&k=3", upload)
    assert status == 200 and json.loads(body)["neighbours"][0]["image_id"] == photo["image_id"]


def test_concurrent_queries_all_get_their_own_answer(server):
    base, rd = server
    ids = [r["image_id"] for r in manifest.read(rd).to_pylist()]
    results = {}

    def ask(i, layer, k):
        answer = json.loads(fetch(f"{base}/api/neighbours?id={i}&layer={layer}&k={k}")[1])
        results[(i, layer, k)] = (answer["query"], [n["image_id"] for n in answer["neighbours"]])

    asks = [(i, layer, 2 + i % 3) for i in ids for layer in ("pixels", "pool")]
    threads = [threading.Thread(target=ask, args=a) for a in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    indexes = {layer: neighbours.open_index(rd, layer) for layer in ("pixels", "pool")}
    expected = {(i, layer, k): (i, [int(n) for n in neighbours_of(indexes[layer], [i], k).image_ids[0] if n >= 0])
                for i, layer, k in asks}
    assert results == expected  # each its own query, layer and k, whatever batch it was searched in


def test_search_batches_answer_as_single_searches(reported_run):
    indexes = {layer: neighbours.open_index(reported_run, layer) for layer in ("pixels", "pool")}
    ids = indexes["pool"].ids.tolist()
    vectors = indexes["pool"].vectors_of(ids[:3])
    requests = [("pool", ids[0], 3), ("pixels", ids[1], 1), ("pool", ids[2], 5), ("pool", vectors[1], 4),
                ("pool", vectors[2], 2), ("pixels", ids[0], 4)]
    answers = search_batch([(indexes[layer], query, k) for layer, query, k in requests])
    for request, (found, distances) in zip(requests, answers):
        layer, query, k = request
        alone = (neighbours_of(indexes[layer], [query], k) if isinstance(query, int)
                 else indexes[layer].search_vectors(query[None], k=k))
        assert found.tolist() == alone.image_ids[0].tolist() and len(found) == k
        np.testing.assert_allclose(distances, alone.distances[0], atol=1e-5)


def test_requests_that_arrive_during_a_batch_form_the_next_one():
    release = threading.Event()
    seen = []

    def run_batch(requests):
        seen.append(list(requests))
        release.wait(5)
        return [r * 10 for r in requests]

    batcher = DynamicBatcher(run_batch, name="test")
    first = batcher.submit(1)
    while not seen:
        threading.Event().wait(0.001)
    rest = [batcher.submit(r) for r in (2, 3, 4)]  # queued while the first batch runs
    release.set()
    assert [f.result(5) for f in [first, *rest]] == [10, 20, 30, 40] and seen == [[1], [2, 3, 4]]

    def fails(requests):
        raise RuntimeError("bad batch")

    broken = DynamicBatcher(fails, name="test-fails")
    with pytest.raises(RuntimeError, match="bad batch"):
        broken.submit(1).result(5)  # a failure reaches every waiting request; none hangs


def test_served_files_are_byte_identical(server):
    base, rd = server
    status, body = fetch(f"{base}/mosaic/pool-grid.jpg")
    assert status == 200 and body == rd.mosaic("pool", "grid").read_bytes()
    assert np.frombuffer(body[:2], np.uint8).tolist() == [0xFF, 0xD8]


def test_the_api_is_described_and_its_page_needs_nothing_from_the_web(server):
    """/openapi.json lists the JSON API; /docs names only files the service itself serves (it
    named a CDN, and on an offline machine the page stayed blank). The browser test renders it."""
    base, _ = server
    status, body = fetch(f"{base}/openapi.json")
    paths = set(json.loads(body)["paths"])
    assert status == 200 and {"/api/neighbours", "/api/image/{image_id}", "/api/explain"} <= paths, paths
    status, page = fetch(f"{base}/docs")
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.decode())
    assert status == 200 and len(urls) >= 3, urls  # the script, the styles, the description (and an icon)
    for url in urls:
        assert url.startswith("/"), url
        status, content = fetch(base + url)
        assert status == 200 and len(content) > 0, url


def test_service_explains_a_pair_as_the_command_does(server):
    from featscope.pipelines.stages import explain

    base, rd = server
    a, b = [r["image_id"] for r in manifest.read(rd).to_pylist() if r["label"] == "photo"][:2]
    status, body = fetch(f"{base}/api/explain?a={a}&b={b}&layer=pool")
    answer = json.loads(body)
    assert status == 200 and answer["method"] == "decomposition", answer
    assert sum(map(sum, answer["maps"][str(a)])) == pytest.approx(answer["similarity"], rel=1e-3)
    assert answer["picture"].startswith("data:image/png;base64,")
    direct = explain.PairExplainer(rd).explain(a, b, "pool")
    assert answer["similarity"] == pytest.approx(direct.result.similarity, abs=1e-5)
    for query, expected in ((f"a={a}&b=999999&layer=pool", 404), (f"a={a}&b={b}&layer=pixels", 400),
                            (f"a={a}&b={b}&layer=nope", 400), (f"a={a}&layer=pool", 400)):
        status, body = fetch(f"{base}/api/explain?{query}")
        assert status == expected and "error" in json.loads(body), (query, body)


def test_uploads_decode_while_the_model_runs(reported_run):
    """Decoding is outside the model's lock: a decoder reading the model's preprocessing must
    not wait for a forward pass in progress (it did, through the lazy model loader)."""
    from featscope.pipelines.core.features import ImageEmbedder

    embedder = ImageEmbedder(reported_run.read_config(), ["pool"])
    photo = next(r for r in manifest.read(reported_run).to_pylist() if r["label"] == "photo")
    upload = open(photo["path"], "rb").read()
    embedder.embed_batch(embedder.model_input(upload)[None])  # loads the model
    model, running, release = embedder.extractor.model, threading.Event(), threading.Event()

    def hold(*_):  # the forward pass starts, then waits until released
        running.set()
        release.wait(30)

    hook = model.register_forward_pre_hook(hold)
    try:
        forward = threading.Thread(target=embedder.embed_batch, args=(embedder.model_input(upload)[None],))
        forward.start()
        assert running.wait(30)
        decoded = []
        decoder = threading.Thread(target=lambda: decoded.append(embedder.model_input(upload)))
        decoder.start()
        decoder.join(10)
        assert not forward.join(0) and forward.is_alive()  # the forward pass is still held...
        assert decoded and decoded[0].shape[0] == 3  # ...and the upload decoded meanwhile
    finally:
        release.set()
        forward.join(30)
        hook.remove()


def test_the_services_threads_share_the_cores_instead_of_each_taking_all(reported_run):
    """Decoders run torch (and faiss) on themselves alone, the model's and the search thread on
    half the cores: an OpenMP team per thread on every core slowed a batch-1 forward pass
    twofold on 2 cores."""
    import faiss
    import torch

    from featscope.pipelines.app.serve import QueryService
    from featscope.pipelines.core.cpus import usable_cpus

    before = torch.get_num_threads()
    service = QueryService(reported_run, decode_threads=2)
    on_thread = lambda *_: (torch.get_num_threads(), faiss.omp_get_max_threads())  # noqa: E731
    assert service.decoders.submit(on_thread).result(10) == (1, 1)
    half = max(1, usable_cpus() // 2)
    for batcher in (service.searches, service.batcher):  # as they start their threads
        probe = DynamicBatcher(lambda requests: [on_thread() for _ in requests], name="test-threads",
                               initializer=batcher.initializer)
        assert probe.submit(0).result(10) == (half, half)
    assert torch.get_num_threads() == before  # the caller's own setting is left alone


@pytest.mark.parametrize("batching", [True, False], ids=["batching-pays", "fp32-cpu"])
def test_where_batching_pays_one_model_thread_takes_batches_of_8_and_the_decoders_yield_to_it(
        reported_run, monkeypatch, batching):
    """bf16 on a CPU with fast bf16: one model thread, batches of 8, decoders at a lower
    priority (Linux); float32 on a CPU: a model thread per half of the cores, batches of 4,
    decoders at the caller's priority."""
    import os

    from featscope.pipelines.app import serve
    from featscope.pipelines.core.cpus import usable_cpus
    from featscope.pipelines.core.device import cpu_has_fast_bf16

    assert serve.batching_pays("cuda", "fp16") and not serve.batching_pays("cpu", "fp32")
    assert serve.batching_pays("cpu", "bf16") == cpu_has_fast_bf16()
    monkeypatch.setattr(serve, "batching_pays", lambda device, precision: batching)
    service = serve.QueryService(reported_run, decode_threads=1)
    if service.device != "cpu":
        pytest.skip("the service embeds on a GPU here")
    priority = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # noqa: E731
    if batching:
        assert (service.model_threads, service.embed_batch, service.batcher.max_batch) == (1, 8, 8)
    else:
        assert service.model_threads == max(1, usable_cpus() // serve.op_threads())
        assert (service.embed_batch, service.batcher.max_batch) == (4, 4)
    mine = priority()
    lower = batching and sys.platform.startswith("linux")
    assert service.decoders.submit(priority).result(10) == (min(19, mine + serve.DECODER_NICENESS) if lower else mine)
    assert priority() == mine  # the caller's own thread is left alone


def test_an_upload_is_decoded_embedded_and_searched_by_the_services_threads_alone(reported_run, monkeypatch):
    """`search_upload` hands each step to the next thread without the event loop, and gives
    the neighbours a search of the image's own vector gives. The model's thread, started by
    the first upload, keeps the service's priority: a thread inherits its starter's, and a
    decoder, which ends the first step, runs at a lower one where batching pays (the model
    then shared a core with the decoders: uploads at 16 clients 101-111/s against 120)."""
    import os

    from featscope.pipelines.app import serve

    monkeypatch.setattr(serve, "batching_pays", lambda device, precision: True)
    service = serve.QueryService(reported_run, decode_threads=1)
    photo = next(r for r in manifest.read(reported_run).to_pylist() if r["label"] == "photo")
    upload = open(photo["path"], "rb").read()
    index = service.checked_upload_layer(service.current_state(), "pool", 4)
    vector, (ids, distances) = service.search_upload(upload, index, "pool", 4).result(120)
    np.testing.assert_allclose(vector, service.embedder.embed(upload, "pool"), rtol=1e-5, atol=1e-6)
    expected = index.search_vectors(vector[None], k=4)
    assert ids.tolist() == expected.image_ids[0].tolist() and ids[0] == photo["image_id"]
    np.testing.assert_allclose(distances, expected.distances[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(serve.ApiError) as refused:  # a decoder's error reaches the waiting request
        service.search_upload(b"not an image", index, "pool", 4).result(30)
    assert refused.value.status == 415 and service.decoding == 0
    if service.device == "cpu" and sys.platform.startswith("linux"):
        priority = lambda thread_id: os.getpriority(os.PRIO_PROCESS, thread_id)  # noqa: E731
        mine = priority(threading.get_native_id())
        assert priority(service.batcher.threads[0].native_id) == mine
        lower = min(19, mine + serve.DECODER_NICENESS)
        assert service.decoders.submit(lambda: priority(threading.get_native_id())).result(10) == lower


def test_model_threads_embed_at_once_each_on_its_own_copy(reported_run):
    """With two model threads, a batch runs while another is held mid-forward, on a copy of
    the model (the layer taps are hooks on one model's modules), with the same vectors."""
    from featscope.pipelines.app.serve import QueryService

    service = QueryService(reported_run, decode_threads=2, model_threads=2)
    photos = [r["path"] for r in manifest.read(reported_run).to_pylist() if r["label"] == "photo"][:2]
    inputs = [service.model_input(open(path, "rb").read()) for path in photos]
    expected = [service.embedder.embed_batch(x[None])["pool"][0] for x in inputs]
    running, release = threading.Event(), threading.Event()

    def hold(*_):
        running.set()
        release.wait(30)

    hook = service.embedder.extractor.model.register_forward_pre_hook(hold)
    try:
        first = service.batcher.submit(inputs[0])  # the first model thread takes the service's own model
        assert running.wait(30)
        second = service.batcher.submit(inputs[1])  # the other thread, on a copy
        np.testing.assert_allclose(second.result(30)["pool"], expected[1], rtol=1e-5, atol=1e-6)
        assert not first.done()
    finally:
        release.set()
        hook.remove()
    np.testing.assert_allclose(first.result(30)["pool"], expected[0], rtol=1e-5, atol=1e-6)
    assert service.batcher.batches == [1, 1]


def test_the_service_says_when_the_report_predates_the_dataset(tmp_path, digits):
    """A report built before the dataset changed shows the images as they were; served, its
    pages used to look current. /api/report says whether it is (status's rule), for the
    pages' notice, until the report is built again; so it does after an output the report
    shows changed (status called such a report current)."""
    from helpers import serving, six_digit_reported_run

    from featscope.pipelines.app.status import status
    from featscope.pipelines.stages import extract

    rd = six_digit_reported_run(tmp_path, digits)
    with serving(rd) as base:
        answer = json.loads(fetch(f"{base}/api/report")[1])
        assert answer == {"current": True, "live_images": 6, "dataset_changed": False, "behind": [], "message": ""}
        moved = next((tmp_path / "images" / "0").glob("*.png"))
        moved.rename(tmp_path / "images" / "1" / moved.name)  # relabelled: same bytes, another folder
        manifest.run(rd, tmp_path / "images")
        status_code, body = fetch(f"{base}/api/report")
        answer = json.loads(body)
        assert status_code == 200 and answer["current"] is False and answer["live_images"] == 6
        assert answer["message"].startswith("this report was built before the dataset last changed")
        assert any(line.startswith("report: stale") for line in status(rd).lines)  # the same rule
        report.build(rd, k=2, progress=False)
        assert json.loads(fetch(f"{base}/api/report")[1])["current"] is True
        # an output the report shows, made after it: its pages do not show it
        extract.extract(rd, ["pool"], workers=0, topk=0, progress=False)  # the moved image's shard
        assert json.loads(fetch(f"{base}/api/report")[1])["behind"] == ["predictions"]  # its page shows none
        report.build(rd, k=2, progress=False)
        neighbours.build(rd, "pool", progress=False)
        answer = json.loads(fetch(f"{base}/api/report")[1])
        assert answer["current"] is False and answer["dataset_changed"] is False
        assert answer["behind"] == ["index/pool/meta.json"]
        assert answer["message"].startswith("this report was built before index/pool/meta.json changed")
        assert "report: stale: built before index/pool/meta.json changed: it shows them as they were then (the " \
               "next workflow run or `featscope report` builds it again)" in status(rd).lines
        report.build(rd, k=2, progress=False)
        assert json.loads(fetch(f"{base}/api/report")[1])["current"] is True
        assert "report: current" in status(rd).lines


def test_every_writing_command_leaves_the_stamps_a_report_opened_from_disk_compares(tmp_path, digits):
    """outputs-live.js: the report's sources as they are now, rewritten by the report and as
    each writing `featscope` command ends, so a page opened from disk finds what the service's
    /api/report finds (`report_behind`). Read-only commands leave it be."""
    from featscope.pipelines.app.cli import main as cli
    from featscope.pipelines.core import derived

    def stamped():
        text = rd.outputs_script.read_text()
        return json.loads(text[text.index("= ") + 2: text.rindex(";")])["sources"]

    def changed_paths(built, now):  # the page's rule (report.js changedSources)
        return sorted({entry.rsplit(" ", 1)[0] for entry in set(built) ^ set(now)})

    rd = six_digit_reported_run(tmp_path, digits)
    built = load_script(rd.report_dir / "data" / "run.js")["sources"]
    assert stamped() == built == derived.stamp(rd, derived.report_sources(rd))
    assert cli(["index", "build", "--run", str(rd.root), "--layer", "pool", "--quiet"]) == 0
    assert changed_paths(built, stamped()) == derived.report_behind(rd) == ["index/pool/meta.json"]
    before = rd.outputs_script.stat().st_mtime_ns
    assert cli(["status", "--run", str(rd.root)]) == 0
    assert cli(["index", "build", "--run", str(rd.root), "--layer", "nope", "--quiet"]) == 2
    assert rd.outputs_script.stat().st_mtime_ns == before
    assert cli(["report", "--run", str(rd.root), "--quiet"]) == 0
    assert stamped() == load_script(rd.report_dir / "data" / "run.js")["sources"] and derived.report_behind(rd) == []
    other = RunDir(tmp_path / "unreported")  # no report, nothing to compare with: no file
    manifest.run(other, tmp_path / "images", model="resnet18", weights="random")
    assert cli(["extract", "--run", str(other.root), "--layers", "pool", "--workers", "0", "--quiet"]) == 0
    assert not other.outputs_script.exists()


def test_answers_from_an_index_short_of_its_recall_say_so(tmp_path):
    """PQ over isotropic vectors (noise images' pixels) misses half of each image's nearest
    neighbours at any search breadth. The build said so once; `query` and the service's
    answers named the neighbours as if complete. Now each answer carries the index's
    measured recall@10 and a warning below the recall aimed for; an exact index's, 1."""
    from helpers import lossy_pixel_run, serving

    from featscope.pipelines.app.status import status

    rd, built = lossy_pixel_run(tmp_path)
    recall = built.meta["recall_at_10"]
    assert recall < 0.95 and built.warning()
    said = f"the 'pixels' index's recall@10 {recall:.3f} is below the 0.95 aimed for"
    assert neighbours.query(rd, "pixels", image_id=5, k=3).warning().startswith(said)
    assert any(line.startswith(f"  approximate: recall@10 {recall:.3f} is below the 0.95 aimed for")
               for line in status(rd).lines)
    service = subprocess.Popen([sys.executable, "-m", "featscope.pipelines.app.cli", "serve", "--run", str(rd.root),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the service says so as it starts
        assert service.stdout.readline().startswith("serving ")
        assert service.stderr.readline().startswith(f"featscope serve: warning: {said}")
    finally:
        service.terminate()
        service.wait(timeout=30)
    with serving(rd) as base:
        answer = json.loads(fetch(f"{base}/api/neighbours?id=5&layer=pixels&k=3")[1])
        assert answer["recall_at_10"] == recall and answer["warning"].startswith(said)
        neighbours.build(rd, "pixels", kind="flat", rebuild=True, progress=False)  # the service follows the rebuild
        answer = json.loads(fetch(f"{base}/api/neighbours?id=5&layer=pixels&k=3")[1])
        assert answer["recall_at_10"] == 1.0 and "warning" not in answer and len(answer["neighbours"]) == 3
        assert neighbours.query(rd, "pixels", image_id=5, k=3).warning() == ""
