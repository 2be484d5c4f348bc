"""The report and the query service in a real headless Chromium (Debian's), driven by
Playwright: no console errors, the mosaic renders, a click on a tile opens that image's
neighbours, an upload through the page returns neighbours. `.ci/run` installs Chromium;
in CI a missing browser fails these tests instead of skipping them."""

import json
import os
import re
import shutil
import threading

import pyarrow.parquet as pq
import pytest

from featscope.pipelines.app.serve import make_server
from featscope.pipelines.core import manifest
from featscope.pipelines.core.store import read_predictions
from featscope.pipelines.stages import index as neighbours

CHROMIUM = os.environ.get("FEATSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The flags a root, offline, headless machine needs (no sandbox; no calls home).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does)"
        if os.environ.get("CI") or os.environ.get("FEATSCOPE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is a test dependency: pip install 'featscope[test]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    page.close()


def expected_neighbours(rd, image_id, layer, k):
    found = neighbours.open_index(rd, layer).search_ids([image_id], k=k + 1).image_ids[0]
    return [str(int(i)) for i in found if i != image_id][:k]


def test_report_from_disk_mosaic_click_opens_the_images_neighbours(reported_run, page, tmp_path):
    rd = reported_run
    page.goto((rd.report_dir / "index.html").as_uri())
    mosaic = page.locator("#mosaic-pool")
    mosaic.wait_for()
    page.wait_for_function("document.getElementById('mosaic-pool').complete && window.FS_MOSAIC")
    assert page.evaluate("document.getElementById('mosaic-pool').naturalWidth") == 3 * 32
    grid = page.evaluate("window.FS_MOSAIC.pool")
    row, col = next((r, c) for r in range(3) for c in range(3) if grid[r][c] >= 0)
    box = mosaic.bounding_box()
    mosaic.click(position={"x": (col + 0.5) * box["width"] / 3, "y": (row + 0.5) * box["height"] / 3})
    page.wait_for_url(f"**/image.html?id={grid[row][col]}")
    shown = page.locator(".neighbours[data-space=pool] .thumb div").all_inner_texts()
    assert [s.split()[0] for s in shown] == expected_neighbours(rd, grid[row][col], "pool", 4)
    assert page.locator(".neighbours[data-space=pixels] .thumb").count() == 4
    page.wait_for_load_state("networkidle")
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "image-page.png"))
    assert page.errors == []


def test_front_page_compares_spaces_per_label(reported_run, page):
    evaluation = json.loads(reported_run.index_evaluation.read_text())
    page.goto((reported_run.report_dir / "index.html").as_uri())
    section = page.locator("section", has_text="feature space against pixel space")
    rows = [r.split("\t") for r in section.locator("tr").all_inner_texts()]
    assert rows[0][2:] == ["0", "1", "7", "photo"]
    shown = {r[0]: [float(x) for x in r[1:]] for r in rows[1:]}
    for layer, v in evaluation["layers"].items():
        want = [v["precision_at_k"]] + [v["per_label"][lab]["precision_at_k"] for lab in ("0", "1", "7", "photo")]
        assert shown[layer] == pytest.approx(want, abs=5e-4)  # shown to three decimals
    assert page.errors == []


def test_unit_gallery_and_unit_page(reported_run, page):
    rd = reported_run
    page.goto((rd.report_dir / "layer.html").as_uri() + "?layer=layer3")
    page.locator("a.unit").first.wait_for()
    assert page.locator("a.unit").count() == 256
    page.wait_for_function("[...document.querySelectorAll('a.unit img')].slice(0, 4).every(i => i.complete)")
    assert page.locator("a.unit > img").count() == 4  # the rendered patch strips ...
    assert page.locator("a.unit .strip img").count() == 252 * 3  # ... and top images for the other units
    page.locator("a.unit").nth(2).click()
    page.wait_for_url("**/unit.html?layer=layer3&unit=2")
    # one caption format for every unit: the image and the activation to three figures
    captions = [re.fullmatch(r"image (\d+) · (-?[\d.]+(?:e[+-]\d+)?)", c)
                for c in page.locator(".thumbs .thumb div").all_inner_texts()]
    top = pq.read_table(rd.topk("layer3")).to_pylist()
    expected = sorted((r["rank"], r["image_id"], r["value"]) for r in top if r["channel"] == 2)
    assert [int(c[1]) for c in captions] == [i for _, i, _ in expected]
    assert [float(c[2]) for c in captions] == pytest.approx([v for *_, v in expected], rel=5e-3)
    assert page.errors == []


def test_image_page_shows_the_prediction_and_timings_and_history_start_collapsed(reported_run, page):
    rd = reported_run
    image_id = manifest.read(rd).to_pylist()[0]["image_id"]
    page.goto((rd.report_dir / "image.html").as_uri() + f"?id={image_id}")
    row = page.locator("tr", has_text="predicted").inner_text()
    best = read_predictions(rd)[image_id][0]
    assert f"class {best[0]} ({best[1]:.2f})" in row  # random weights: classes shown by number
    page.goto((rd.report_dir / "index.html").as_uri())
    built = page.evaluate("window.FS_RUN.built")
    assert page.locator("tr", has_text="report built").inner_text().split("\t")[-1] == built
    history = page.locator("section", has_text="Run history").locator("summary").inner_text()
    assert history.startswith("1 workflow run; the last ") and ": ok, +" in history
    details = page.locator("section", has_text="Stage timings").locator("details")
    assert details.count() == 1 and details.get_attribute("open") is None
    assert not page.locator("section", has_text="Stage timings").locator("table").is_visible()
    assert page.errors == []


@pytest.fixture(scope="module")
def served(reported_run):
    server = make_server(reported_run, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_served_page_queries_by_upload(reported_run, served, page, tmp_path):
    rd = reported_run
    photo = next(r for r in manifest.read(rd).to_pylist() if r["label"] == "photo")
    page.goto(served + "/")
    page.wait_for_url("**/report/index.html")
    page.locator("#upload").set_input_files(photo["path"])
    page.locator("#upload-results .thumb").first.wait_for(timeout=60_000)
    tiles = page.locator("#upload-results .thumb")
    assert tiles.count() == 4
    assert tiles.first.get_attribute("href") == f"image.html?id={photo['image_id']}"  # the image finds itself
    page.screenshot(path=str(tmp_path / "served.png"), full_page=True)
    assert page.errors == []


@pytest.fixture(scope="module")
def trusted_run(reported_run, tmp_path_factory):
    """The reported run with its Grad-CAM maps evaluated, sanity-checked, one query's pool
    neighbours explained and two layer3 units visualised, then reported again."""
    from featscope.pipelines.app import report
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import explain
    from featscope.pipelines.stages import saliency_trust as trust

    rd = RunDir(tmp_path_factory.mktemp("trusted") / "run")
    shutil.copytree(reported_run.root, rd.root)
    trust.evaluate(rd, trust.EvaluateOptions(steps=4, precision="fp32", images_per_task=100), progress=False)
    trust.sanity(rd, trust.SanityOptions(sample=2), progress=False)
    photos = [r["image_id"] for r in manifest.read(rd).to_pylist() if r["label"] == "photo"]
    explain.run(rd, explain.ExplainOptions(layer="pool", queries=[photos[0]], k=2))
    from featscope.pipelines.stages import atlas, units

    units.render(rd, units.RenderOptions(layer="layer3", units="0-1", size=32, steps=2, diversity=2), progress=False)
    units.label(rd, units.LabelOptions(layer="layer3", gradient_images=0))
    atlas.atlas(rd, atlas.AtlasOptions(layer="layer3", grid=3, images=12, per_image=1, min_count=2, size=24, steps=2,
                                       perplexity=3), progress=False)
    report.build(rd, k=4, progress=False)
    return rd, photos


def test_trust_page_shows_aucs_verdicts_and_plots(trusted_run, page):
    rd, _ = trusted_run
    page.goto((rd.report_dir / "index.html").as_uri())
    page.locator("#trust-link").click()
    page.wait_for_url("**/trust.html")
    rows = [r.split("\t") for r in page.locator("section", has_text="Faithfulness").locator("tr").all_inner_texts()]
    table = pq.read_table(rd.faithfulness("gradcam"))
    mean = float(table["deletion_auc"].to_numpy().mean())
    assert rows[1][0] == "gradcam" and int(rows[1][1]) == table.num_rows
    assert float(rows[1][2].split()[0]) == pytest.approx(mean, abs=5e-4)
    verdict = json.loads(rd.sanity_verdicts.read_text())["gradcam"]["verdict"]
    assert verdict in page.locator("section", has_text="Sanity check").inner_text()
    page.wait_for_load_state("networkidle")
    assert page.evaluate("[...document.images].length >= 1 && [...document.images].every(i => i.naturalWidth > 0)")
    assert page.errors == []


def test_image_page_shows_maps_with_aucs_and_explains_a_neighbour(trusted_run, page):
    rd, photos = trusted_run
    page.goto((rd.report_dir / "image.html").as_uri() + f"?id={photos[0]}")
    figure = page.locator("figure.saliency[data-method=gradcam]")
    assert figure.locator("img").count() == 2  # the overlay and the map on its own
    row = pq.read_table(rd.faithfulness("gradcam")).to_pylist()
    auc = next(r for r in row if r["image_id"] == photos[0])
    assert f"deletion {auc['deletion_auc']:.3f}" in figure.inner_text()
    page.locator(".neighbours[data-space=pool] .why").first.click()  # explained on disk by `explain --queries`
    picture = page.locator(".pair[data-space=pool] img")
    picture.wait_for()
    page.wait_for_function("document.querySelector('.pair[data-space=pool] img').naturalWidth > 0")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.errors == []


def test_the_api_description_renders_offline(served, page):
    """/docs (Swagger UI) loaded its script and styles from a CDN, so on a machine without
    internet (an offline cluster, this one) the page stayed blank. They come from the service
    now, and the page lists the JSON API's operations."""
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(served) else None)
    page.goto(served + "/docs")
    page.locator(".opblock-summary-path").first.wait_for(timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/api/neighbours", "/api/image/{image_id}"} <= {p.replace("\u200b", "") for p in paths}, paths
    assert outside == [] and page.errors == [], (outside, page.errors)


def test_served_image_page_explains_any_neighbour_through_the_api(reported_run, served, page):
    photo = next(r for r in manifest.read(reported_run).to_pylist() if r["label"] == "photo")
    page.goto(served + f"/report/image.html?id={photo['image_id']}")
    page.locator(".neighbours[data-space=pool] .why").nth(1).click()
    page.wait_for_function("(document.querySelector('.pair[data-space=pool] img') || {}).naturalWidth > 0",
                           timeout=60_000)
    assert "similarity" in page.locator(".pair[data-space=pool]").inner_text()
    assert page.errors == []


def test_unit_pages_show_the_feature_visualisation_beside_the_dataset_examples(trusted_run, page):
    rd, _ = trusted_run
    page.goto((rd.report_dir / "layer.html").as_uri() + "?layer=layer3")
    page.locator("a.unit img.vis").first.wait_for()
    assert page.locator("a.unit img.vis").count() == 2
    page.locator("a.unit").nth(1).click()
    page.wait_for_url("**/unit.html?layer=layer3&unit=1")
    caption = page.locator("figure.vis figcaption").first.inner_text()
    row = pq.read_table(rd.units_table("layer3")).to_pylist()[1]
    assert caption.startswith(f"feature visualisation: activation {row['activation']:.3g}"[:34])
    assert page.locator(".thumbs .thumb").count() == 3  # the unit's top-k dataset images beside it
    named = pq.read_table(rd.units_labels("layer3")).to_pylist()[1]
    assert page.locator("p.unit-label").inner_text().startswith(f"label: {named['label']} (AUC {named['auc']:.3f}")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.errors == []


def test_layer_page_grid_and_unit_histogram_and_masks(trusted_run, page):
    """Microscope's grid of visualisations links to unit pages; a unit page plots its activations
    over the dataset (the sketch) with the mask threshold, and says its strips show masks."""
    rd, _ = trusted_run
    page.goto((rd.report_dir / "layer.html").as_uri() + "?layer=layer3")
    page.locator(".vis-grid a").first.wait_for()
    assert page.locator(".vis-grid a").count() == 2
    assert page.locator("a[href^='atlas.html']").count() >= 1
    page.locator(".vis-grid a").nth(1).click()
    page.wait_for_url("**/unit.html?layer=layer3&unit=1")
    sketch = pq.read_table(rd.topk_sketch("layer3")).to_pylist()[1]
    assert page.locator("figure.histogram rect").count() > 1
    assert page.locator("figure.histogram line.threshold").count() == 1
    assert f"{sketch['threshold']:.3g}"[:4] in page.locator("figure.histogram figcaption").inner_text()
    assert "activation is in its top 0.5%" in page.locator("figure.patches figcaption").inner_text()
    assert page.locator("figure.variants img").count() == 2  # the diverse visualisations
    page.wait_for_load_state("networkidle")
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.errors == []


def test_atlas_page_zooms_and_a_cell_lists_its_images(trusted_run, page):
    rd, _ = trusted_run
    cells = pq.read_table(rd.atlas_table("layer3")).to_pylist()
    page.goto((rd.report_dir / "atlas.html").as_uri() + "?layer=layer3")
    page.locator(".atlas-grid .cell").first.wait_for()
    assert page.locator(".atlas-grid .cell").count() == 9
    assert page.locator(".atlas-grid .cell img").count() == sum(c["rendered"] for c in cells)
    before = page.locator(".atlas-grid .cell").first.bounding_box()["width"]
    page.get_by_role("button", name="+").click()
    assert page.locator(".atlas-grid .cell").first.bounding_box()["width"] > before
    cell = max(cells, key=lambda c: c["count"])
    page.locator(f".atlas-grid .cell[data-cell='{cell['gy']}-{cell['gx']}']").click()
    assert page.locator(".atlas-detail h3").inner_text().endswith(f"{cell['count']} activation vectors")
    assert page.locator(".atlas-detail .thumb").count() == len(cell["image_ids"])
    page.locator(".atlas-detail .thumb").first.click()
    page.wait_for_url(f"**/image.html?id={cell['image_ids'][0]}")
    assert page.errors == []


def test_a_copy_of_the_report_away_from_its_run_shows_every_picture(trusted_run, page, tmp_path):
    """The report keeps the run's pictures it shows (report/pictures/): its pages link to no run
    file, so a picture drawn again later cannot appear beside the old lists, and the folder
    alone (archived, mailed) shows every strip, visualisation, map, pair and plot."""
    rd, photos = trusted_run
    copy = tmp_path / "report"
    shutil.copytree(rd.report_dir, copy)
    for name, query, least in (("image", f"?id={photos[0]}", 3), ("layer", "?layer=layer3", 4),
                               ("unit", "?layer=layer3&unit=1", 5), ("trust", "", 1), ("index", "", 1)):
        page.goto((copy / f"{name}.html").as_uri() + query)
        page.wait_for_load_state("networkidle")
        if name == "image":
            page.locator(".neighbours[data-space=pool] .why").first.click()  # the pair explained on disk
            page.wait_for_function("(document.querySelector('.pair[data-space=pool] img') || {}).complete")
        page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
        page.wait_for_function("[...document.images].every(i => i.complete)")
        sources = page.evaluate("[...document.images].map(i => [i.src, i.naturalWidth > 0])")
        assert len(sources) >= least, name
        assert [s for s in sources if not (s[0].startswith(copy.as_uri()) and s[1])] == [], name
    # the run's manifest-live.js is not beside a copy: the only load that fails, and quietly
    # (outputs-live.js, loaded after it, is not asked for)
    assert all("manifest-live" in e or "ERR_FILE_NOT_FOUND" in e for e in page.errors), page.errors


def stale_notice(page, url: str) -> str | None:
    """The "Not current" notice of the page at `url` once it has loaded (None where it shows none)."""
    page.goto(url)
    page.wait_for_load_state("networkidle")
    notice = page.locator(".stale")
    return notice.inner_text() if notice.count() else None


def test_served_pages_say_when_the_report_predates_the_dataset(tmp_path, digits, page):
    from helpers import serving, six_digit_reported_run

    from featscope.pipelines.app import report
    from featscope.pipelines.stages import extract
    from featscope.pipelines.stages import index as neighbours

    rd = six_digit_reported_run(tmp_path, digits)
    with serving(rd) as base:
        assert stale_notice(page, base + "/report/index.html") is None
        moved = next((tmp_path / "images" / "0").glob("*.png"))
        moved.rename(tmp_path / "images" / "1" / moved.name)  # relabelled: the report shows its old label
        manifest.run(rd, tmp_path / "images")
        image_id = manifest.read(rd)["image_id"][0].as_py()
        for url in ("/report/index.html", f"/report/image.html?id={image_id}"):
            assert (stale_notice(page, base + url) or "").startswith(
                "Not current: built from 6 images, the run has 6 now; this report was built before the dataset last "
                "changed")
        report.build(rd, k=2, progress=False)
        assert stale_notice(page, base + "/report/index.html") is None
        extract.extract(rd, ["pool"], workers=0, topk=0, progress=False)
        report.build(rd, k=2, progress=False)
        neighbours.build(rd, "pool", progress=False)  # an output the report would show, made after it
        assert (stale_notice(page, base + "/report/index.html") or "").startswith(
            "Not current: this report was built before index/pool/meta.json changed")
        assert page.errors == []


def test_the_page_says_when_the_index_misses_neighbours(tmp_path, page):
    from helpers import lossy_pixel_run, serving

    rd, built = lossy_pixel_run(tmp_path)
    with serving(rd) as base:
        page.goto(base + "/report/index.html")
        page.locator("#upload").set_input_files(str(tmp_path / "images" / "noise" / "007.png"))
        page.locator("#upload-results .thumb").first.wait_for(timeout=60_000)
        said = page.locator("#upload-status").inner_text()
        assert f"(the 'pixels' index's recall@10 {built.meta['recall_at_10']:.3f} is below the 0.95 aimed for" in said
        page.goto(base + "/report/image.html?id=5")  # the report's own lists come from the same index
        note = page.locator(".neighbours[data-space=pixels]").locator("xpath=..").locator(".recall")
        assert note.inner_text().startswith(f"Approximate: the 'pixels' index's recall@10 "
                                            f"{built.meta['recall_at_10']:.3f} is below")
        assert page.errors == []


def test_pages_opened_from_disk_say_when_the_report_predates_the_dataset(tmp_path, digits, page):
    """From file:// the page cannot ask a service: it loads the run's manifest-live.js (the
    live images' stamp, which the manifest writes) and compares it with the report's own."""
    from helpers import six_digit_reported_run

    from featscope.pipelines.app import report

    rd = six_digit_reported_run(tmp_path, digits)
    front = (rd.report_dir / "index.html").as_uri()
    assert stale_notice(page, front) is None
    moved = next((tmp_path / "images" / "0").glob("*.png"))
    moved.rename(tmp_path / "images" / "1" / moved.name)
    next((tmp_path / "images" / "1").glob("*.png")).unlink()  # and one image gone: 5 live now
    manifest.run(rd, tmp_path / "images")
    assert (stale_notice(page, front) or "").startswith(
        "Not current: built from 6 images, the run has 5 now; this report was built before the dataset last changed")
    report.build(rd, k=2, progress=False)
    assert stale_notice(page, front) is None
    assert page.errors == []


def test_pages_opened_from_disk_say_when_an_output_they_show_changed_since(tmp_path, digits, page):
    """The dataset unchanged, an output the report shows made after it: every `featscope`
    command leaves the outputs' stamps in the run's outputs-live.js, which the page compares
    with the report's own (the service's /api/report says the same when served)."""
    from helpers import six_digit_reported_run

    from featscope.pipelines.app import report
    from featscope.pipelines.app.cli import main as cli

    rd = six_digit_reported_run(tmp_path, digits)
    front = (rd.report_dir / "index.html").as_uri()
    assert cli(["index", "build", "--run", str(rd.root), "--layer", "pool", "--quiet"]) == 0
    for url in (front, (rd.report_dir / "image.html").as_uri() + "?id=0"):
        assert stale_notice(page, url) == ("Not current: this report was built before index/pool/meta.json changed: it "
                                           "shows them as they were then. The next workflow run or `featscope report` "
                                           "builds it again.")
    report.build(rd, k=2, progress=False)
    assert stale_notice(page, front) is None
    assert page.errors == []


def test_image_pages_say_when_an_index_lacks_images_added_since_it_was_built(tmp_path, digits, page):
    """A report built after images were added but before the indexes took them: a new image's
    page says it is not in the index yet, and an older one's that its list may miss one."""
    from helpers import write_dataset

    from featscope.pipelines.app import report
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import extract

    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0, 1), digits_per_label=3)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images, model="resnet18", weights="random", shard_size=5)
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    old = int(manifest.read(rd)["image_id"][0].as_py())
    write_dataset(images, digits, n_photos=0, labels=(3,), digits_per_label=2)
    manifest.run(rd, images)
    extract.extract(rd, ["pool"], workers=0, progress=False)
    new = max(manifest.read(rd)["image_id"].to_pylist())
    report.build(rd, k=2, progress=False)
    page.goto((rd.report_dir / "image.html").as_uri() + f"?id={new}")
    page.locator("p.unindexed").wait_for()
    assert page.locator("p.unindexed").inner_text().startswith("This image is not in the pool index yet (it lacks 2 of")
    assert page.locator(".neighbours[data-space=pool]").count() == 0
    page.goto((rd.report_dir / "image.html").as_uri() + f"?id={old}")
    page.locator("p.unindexed").wait_for()
    assert page.locator("p.unindexed").inner_text().startswith("The pool index lacks 2 of the run's images, added")
    assert page.locator(".neighbours[data-space=pool] img").count() == 2
    assert page.errors == []


def test_pages_show_a_notice_where_an_output_was_made_from_an_earlier_one(tmp_path, digits, page):
    """A mosaic drawn from an earlier map, precision measured on an earlier index, a top-k
    merged before a shard's candidates changed and pairs explained for an earlier index's
    neighbours: the pages say so in their place."""
    from helpers import write_dataset

    from featscope.pipelines.app import report
    from featscope.pipelines.core.atomic import atomic_path
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import embed, explain, extract, mosaic, topk

    write_dataset(tmp_path / "images", digits, n_photos=2, labels=(0, 1), digits_per_label=4)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random", shard_size=5)
    extract.extract(rd, ["pool", "layer2"], workers=0, topk=2, progress=False)
    topk.merge(rd, "layer2")
    embed.embed(rd, "pool", perplexity=2)
    mosaic.grid(rd, "pool", side=3, tile=16, progress=False)
    neighbours.build(rd, "pool", progress=False)
    neighbours.evaluate(rd)
    query = int(manifest.read(rd)["image_id"][0].as_py())
    explain.run(rd, explain.ExplainOptions(layer="pool", queries=[query], k=2))
    embed.embed(rd, "pool", perplexity=2, refit=True)  # the map changed after the grid was drawn
    neighbours.build(rd, "pool", rebuild=True, progress=False)  # the index, after the evaluation
    part = rd.topk_candidates_part("layer2", 0)
    table = pq.read_table(part)
    with atomic_path(part) as tmp:  # the shard's candidates written again
        pq.write_table(table, tmp)
    built = report.build(rd, k=2, progress=False)
    assert "shown with a notice: top-k layer2, mosaic pool, precision@k, explained pairs pool" in built.line()
    page.goto((rd.report_dir / "index.html").as_uri())
    page.wait_for_load_state("networkidle")
    notices = page.locator("p.stale").all_inner_texts()
    assert any(n.startswith("The grid mosaic of pool was drawn from an earlier map") for n in notices)
    assert any(n.startswith("precision@k was measured on an earlier index") for n in notices)
    assert page.locator("img.mosaic").count() == 0
    for url in ("layer.html?layer=layer2", "unit.html?layer=layer2&unit=0"):
        page.goto((rd.report_dir / url.split("?")[0]).as_uri() + "?" + url.split("?")[1])
        page.locator("p.stale").first.wait_for()
        assert page.locator("p.stale").first.inner_text().startswith("This top-k was merged before")
    page.goto((rd.report_dir / "image.html").as_uri() + f"?id={query}")
    page.locator(".neighbours[data-space=pool] .why").first.click()
    page.locator(".pair p.stale").wait_for()
    assert page.locator(".pair p.stale").inner_text().startswith("The pairs of pool on disk were explained for the "
                                                                  "neighbours of an earlier index")
    assert page.errors == []
