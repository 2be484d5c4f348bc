"""`featscope explain` on a small run: maps that sum to the pair's similarity, which is that of
the stored vectors up to their precision; batches for queries that follow the index; one-line
errors."""

import shutil
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from featscope.kernels.batchnorm_folding import conv_bn_pairs
from featscope.kernels.pair_similarity import APPROXIMATE, EXACT
from featscope.pipelines.app.cli import main as cli
from featscope.pipelines.core.neighbours import neighbours_of, open_index
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import explain


@pytest.fixture(scope="module")
def run(reported_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("explain") / "run"
    shutil.copytree(reported_run.root, copy)
    return RunDir(copy)


@pytest.fixture(scope="module")
def explainer(run):
    return explain.PairExplainer(run)


def photo_ids(run):
    from featscope.pipelines.core import manifest

    table = manifest.read(run).to_pylist()
    return [r["image_id"] for r in table if r["label"] == "photo"]


@pytest.mark.parametrize("layer", ["pool", "layer3", "layer3@2x2"])
def test_pooled_layers_split_exactly_and_match_the_stored_vectors(run, explainer, layer):
    a, b = photo_ids(run)[:2]
    e = explainer.explain(a, b, layer)
    assert e.result.method == EXACT
    assert [float(m.sum()) for m in e.result.maps] == pytest.approx([e.result.similarity] * 2, rel=1e-4)
    if layer != "layer3@2x2":  # extracted: the stored vectors (bf16 forward, float16 storage) agree
        assert e.stored_similarity == pytest.approx(e.result.similarity, abs=0.02)
    else:
        assert e.stored_similarity is None


def test_no_model_is_traced_while_a_pair_is_explained(run, explainer):
    """Folding batch norms traces a model with torch.fx, which patches nn.Module.__call__ for
    the whole process (the query service does it when its upload model loads): a pair's
    forward pass on another thread meanwhile would fail. The trace waits for the pair, and
    the pair's maps are those of a quiet run."""
    a, b = photo_ids(run)[:2]
    quiet = explainer.explain(a, b, "pool")
    inside, release, found = threading.Event(), threading.Event(), {}

    def hold(*_):
        if not inside.is_set():
            inside.set()
            release.wait(30)

    first_conv = next(m for m in explainer.loaded.module.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_hook(hold)
    pair = threading.Thread(target=lambda: found.setdefault("pair", explainer.explain(a, b, "pool")))
    trace = threading.Thread(target=lambda: found.setdefault("pairs", conv_bn_pairs(torchvision.models.resnet18())))
    try:
        pair.start()
        assert inside.wait(30)
        trace.start()
        trace.join(1.0)
        assert trace.is_alive(), "the model was traced while the pair's forward pass was under way"
    finally:
        release.set()
        pair.join(60)
        trace.join(60)
        handle.remove()
    assert len(found["pairs"]) == 20  # resnet18's conv -> BN pairs: the trace itself worked
    assert torch.equal(found["pair"].result.maps, quiet.result.maps)


def test_a_fully_connected_layer_says_it_is_approximate(run, explainer):
    a, b = photo_ids(run)[:2]
    e = explainer.explain(a, b, "fc")
    assert e.result.method == APPROXIMATE and "gradient x activation" in e.how


def test_queries_explain_each_query_with_its_index_neighbours(run, capsys):
    query = photo_ids(run)[0]
    assert cli(["explain", "--run", str(run.root), "--layer", "pool", "--queries", str(query), "--k", "3"]) == 0
    expected = neighbours_of(open_index(run, "pool"), [query], 3).image_ids[0].tolist()
    listed = explain.read_queries(run, "pool")[query]
    assert [n[0] for n in listed] == expected
    # the report shows them, less a neighbour that left the dataset since
    from featscope.pipelines.app import report
    from featscope.pipelines.app.report_pictures import KeptPictures
    from featscope.pipelines.core import manifest

    live = set(manifest.read(run)["image_id"].to_pylist())
    explained = (lambda images: report._explained(run, images, KeptPictures(run))[0][query]["pool"])
    assert [n[0] for n in explained(live)] == expected
    assert [n[0] for n in explained(live - {expected[0]})] == expected[1:]
    for other in expected:
        with np.load(run.explained_pair("pool", query, other, "npz")) as stored:
            assert float(stored["maps_a"].sum()) == pytest.approx(float(stored["similarity"]), rel=1e-4)
        assert Image.open(run.explained_pair("pool", query, other)).width > 300
    # a later batch replaces the earlier one's files: the report shows the current lists only
    other_query = photo_ids(run)[1]
    assert cli(["explain", "--run", str(run.root), "--layer", "pool", "--queries", str(other_query), "--k", "2"]) == 0
    assert list(explain.read_queries(run, "pool")) == [other_query]
    assert not any(run.explained_pair("pool", query, other).exists() for other in expected)


def test_bad_input_is_one_line(run, capsys):
    a = photo_ids(run)[0]
    for argv, said in (
        (["--layer", "pixels", "--pair", f"{a},{a}"], "pixel-space"),
        (["--layer", "pool", "--pair", f"{a},123456"], "image_id 123456"),
        (["--layer", "nope", "--pair", f"{a},{a}"], "unknown layer"),
        (["--layer", "pool", "--pair", "1-2"], "--pair"),
    ):
        assert cli(["explain", "--run", str(run.root), *argv]) == 2
        assert said in capsys.readouterr().err


def test_a_fully_connected_layer_is_explained_even_with_frozen_weights(run, explainer):
    """The model is shared within a process; a caller may have frozen its parameters."""
    a, b = photo_ids(run)[:2]
    for parameter in explainer.loaded.module.parameters():
        parameter.requires_grad_(False)
    try:
        assert explainer.explain(a, b, "fc").result.method == APPROXIMATE
    finally:
        for parameter in explainer.loaded.module.parameters():
            parameter.requires_grad_(True)


def test_pairs_explained_on_an_earlier_index_are_stale_and_left_out_of_the_report(reported_run, tmp_path, capsys):
    """A query's neighbours come from the layer's index. After the index took a shard
    extracted again (here the query's vector swapped with a digit's), the pairs on disk were
    no longer the query's neighbours, yet status called them current and the report showed
    them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import load_script

    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.atomic import atomic_path
    from featscope.pipelines.core.store import column_array
    from featscope.pipelines.stages import index as neighbours

    shutil.copytree(reported_run.root, tmp_path / "run")
    rd = RunDir(tmp_path / "run")
    query = photo_ids(rd)[0]
    assert cli(["explain", "--run", str(rd.root), "--layer", "pool", "--queries", str(query), "--k", "2"]) == 0
    assert "explain pool: 2 pairs, current" in status(rd).lines
    part = next(p for p in rd.feature_parts("pool") if query in pq.read_table(p)["image_id"].to_pylist())
    table = pq.read_table(part)
    ids = table["image_id"].to_pylist()
    labels = dict(zip(*(manifest_column(rd, c) for c in ("image_id", "label"))))
    digit = next(i for i in ids if labels[i] != "photo")
    values = column_array(table, "feature").copy()
    values[[ids.index(query), ids.index(digit)]] = values[[ids.index(digit), ids.index(query)]]
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), values.shape[1])
    with atomic_path(part) as tmp:  # as extract writes a shard extracted again
        pq.write_table(table.set_column(table.schema.get_field_index("feature"), "feature", column), tmp)
    neighbours.build(rd, "pool", progress=False)
    before = [n[0] for n in explain.read_queries(rd, "pool")[query]]
    now = neighbours_of(open_index(rd, "pool"), [query], 2).image_ids[0].tolist()
    assert now != before  # the listed pairs are no longer the query's neighbours
    said = status(rd)
    assert "explain pool" in said.stale
    assert (f"explain pool: 2 pairs, stale: their neighbours were found in an earlier index of pool (the report "
            f"leaves them out): the next workflow run or `featscope explain --layer pool --queries {query}` explains "
            "them again") in said.lines
    summary = report.build(rd, k=2, progress=False)
    assert "explained pairs pool" in summary.stale
    run_js = load_script(rd.report_dir / "data" / "run.js")
    assert run_js["explained_stale"] == ["pool"] and run_js["explained_layers"] == []
    assert not any("explained" in entry for chunk in (rd.report_dir / "data").glob("images-*.js")
                   for entry in load_script(chunk).values())
    assert cli(["explain", "--run", str(rd.root), "--layer", "pool", "--queries", str(query), "--k", "2"]) == 0
    assert [n[0] for n in explain.read_queries(rd, "pool")[query]] == now
    assert "explain pool: 2 pairs, current" in status(rd).lines
    report.build(rd, k=2, progress=False)
    assert load_script(rd.report_dir / "data" / "run.js")["explained_stale"] == []


def manifest_column(rd, column):
    from featscope.pipelines.core import manifest

    return manifest.read(rd)[column].to_pylist()


def test_pairs_explained_from_an_index_that_lacks_new_images_are_stale(reported_run, tmp_path, digits):
    """Images added and extracted, the index not yet updated: `explain --queries` chose each
    query's neighbours from an index without them (a nearer one may be among them), said
    nothing, and status called the pairs current; a new image as a query failed on 'not in
    this index'."""
    from helpers import write_dataset

    from featscope.kernels.errors import FeatscopeError
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.manifest import run as update_manifest
    from featscope.pipelines.stages import extract
    from featscope.pipelines.stages import index as neighbours

    shutil.copytree(reported_run.root, tmp_path / "run")
    shutil.copytree(reported_run.root.parent / "images", tmp_path / "images")
    rd = RunDir(tmp_path / "run")
    query = photo_ids(rd)[0]
    before = set(manifest_column(rd, "image_id"))
    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(3,), digits_per_label=2)
    update_manifest(rd, tmp_path / "images")
    extract.extract(rd, ["pool", "layer3", "pixels"], workers=0, topk=3, progress=False)
    new = sorted(set(manifest_column(rd, "image_id")) - before)
    summary = explain.run(rd, explain.ExplainOptions(layer="pool", queries=[query], k=2))
    assert summary.line().endswith(f"; 2 live images of the run not in the 'pool' index yet (added since it was last "
                                   f"updated), which no answer names: update it with `featscope index build --run "
                                   f"{rd.root} --layer pool`")
    said = status(rd)
    assert "explain pool" in said.stale
    assert (f"explain pool: 2 pairs, stale: their neighbours were found in an index of pool that lacks 2 live images "
            f"added since it was built, which may be nearer: the next workflow run, or `featscope index build` and "
            f"then `featscope explain --layer pool --queries {query}`, explains them again") in said.lines
    listed = rd.explained_queries("pool").read_bytes()
    with pytest.raises(FeatscopeError, match=f"image {new[0]} is not in the 'pool' index yet"):
        explain.run(rd, explain.ExplainOptions(layer="pool", queries=[new[0]], k=2))
    assert rd.explained_queries("pool").read_bytes() == listed  # refused before the list was touched
    neighbours.build(rd, "pool", progress=False)
    assert "index yet" not in explain.run(rd, explain.ExplainOptions(layer="pool", queries=[query], k=2)).line()
    assert "explain pool: 2 pairs, current" in status(rd).lines
