"""Why two images are neighbours at a layer: a map on each of what its regions add to the pair's
similarity (`kernels.pair_similarity`), as numbers (.npz) and a picture (.png).

`featscope explain --pair A,B` explains one pair; `--queries 0,5002` explains each query with
its k nearest images in the layer's index (what the report's image pages show from disk; the
query service explains any pair on request). The images go through the model as extraction
saw them (resized, centre-cropped), so the similarity explained is that of the stored vectors,
up to the precision they were extracted and stored in; both numbers are recorded.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from featscope.kernels.batchnorm_folding import TRACING
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.pair_similarity import EXACT, SIMILARITIES, PairMaps, pair_maps
from featscope.kernels.params import ParamError
from featscope.kernels.saliency import gradcam_layer
from featscope.kernels.spaces import PIXELS
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, withdraw, write_json_atomic
from featscope.pipelines.core.images import BadImage, read_pixels
from featscope.pipelines.core.neighbours import neighbours_of, not_in_index, open_index, unindexed_note
from featscope.pipelines.core.options import Command, Group, Options, option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import column_array
from featscope.pipelines.core.text import plural
from featscope.pipelines.core.workers import model_ref, worker_model
from featscope.pipelines.render.overlay import heat_overlay
from featscope.pipelines.render.panels import panel


@dataclass
class Explanation:
    a: int
    b: int
    layer: str
    result: PairMaps
    inputs: torch.Tensor  # (2,3,crop,crop) uint8: what the model saw
    stored_similarity: float | None  # of the stored (extracted) vectors, where the layer has them

    @property
    def how(self) -> str:
        """Which split was used, in words."""
        if self.result.method == EXACT:
            return "exact decomposition over pairs of positions (Stylianou et al. 2019)"
        return "gradient x activation at the last conv block (first-order; the layer is not a pool of a conv map)"

    def to_json(self) -> dict:
        h, w = self.result.grid
        return {"a": self.a, "b": self.b, "layer": self.layer, "similarity": round(self.result.similarity, 6),
                "stored_similarity": None if self.stored_similarity is None else round(self.stored_similarity, 6),
                "method": self.result.method, "how": self.how, "grid": [h, w],
                "maps": {str(self.a): _rounded(self.result.maps[0]), str(self.b): _rounded(self.result.maps[1])},
                "sums": [round(float(m.sum()), 6) for m in self.result.maps]}


def _rounded(values: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in values]


class PairExplainer:
    """The run's model, ready to explain pairs (one call at a time: hooks go on a shared model)."""

    def __init__(self, rd: RunDir, device: str = "auto"):
        self.rd = rd
        self.loaded, self.device, _ = worker_model(model_ref(rd, device))
        self.read_manifest()
        self.lock = threading.Lock()

    def read_manifest(self) -> None:
        """The live images' paths, read again after the run changed (the query service's
        explainer outlives reruns). Arrow columns sorted by id, not a dict per image."""
        table = manifest.read(self.rd).select(["image_id", "path"]).sort_by("image_id")
        self._images = table["image_id"].to_numpy(), table["path"].combine_chunks()  # one assignment: no torn pair

    def path(self, image_id: int) -> str | None:
        """The image's file, or None if the run has no such (live) image."""
        ids, paths = self._images
        at = int(np.searchsorted(ids, image_id))
        return paths[at].as_py() if at < len(ids) and ids[at] == image_id else None

    def explain(self, a: int, b: int, layer: str, similarity: str = "cosine") -> Explanation:
        if similarity not in SIMILARITIES:
            raise FeatscopeError(f"similarity must be one of {', '.join(SIMILARITIES)}, not '{similarity}'")
        if layer == PIXELS:
            raise FeatscopeError("explain needs a layer of the model; pixel-space neighbours match pixel by pixel")
        spec = self.loaded.layer(layer)
        missing = [i for i in (a, b) if self.path(i) is None]
        if missing:
            raise FeatscopeError(f"image_id {missing[0]} is not in run {self.rd.root}")
        prep = self.loaded.preprocessing
        try:
            inputs = torch.stack([prep.to_uint8(read_pixels(self.path(i), min_size=prep.resize)) for i in (a, b)])
        except BadImage as e:
            raise FeatscopeError(f"cannot read an image of the pair: {e}") from None
        x = prep.normalize(inputs.to(self.device))
        model = self.loaded.module
        module = model.get_submodule(spec.module_path)
        with self.lock, TRACING:  # the query service may be folding its upload model on another thread
            if spec.grid:
                result = pair_maps(model, x, module, grid=spec.grid, similarity=similarity)
            elif spec.kind == "conv" or (spec.kind == "auto" and _is_conv_map(model, x, module)):
                result = pair_maps(model, x, module, similarity=similarity)
            else:
                result = pair_maps(model, x, gradcam_layer(model, None), feature=module, similarity=similarity)
        return Explanation(a, b, layer, result, inputs.cpu(), _stored_similarity(self.rd, layer, a, b, similarity))


def _is_conv_map(model: torch.nn.Module, x: torch.Tensor, module: torch.nn.Module) -> bool:
    shapes = []
    handle = module.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return len(shapes[0]) == 4 and shapes[0][2] * shapes[0][3] > 1


def _stored_similarity(rd: RunDir, layer: str, a: int, b: int, similarity: str) -> float | None:
    """The similarity of the two stored vectors (float16), or None where the layer has none."""
    parts = rd.feature_parts(layer)
    if not parts:
        return None
    table = pq.read_table(parts, columns=["image_id", "feature"], filters=[("image_id", "in", [a, b])])
    ids = table["image_id"].to_pylist()
    if a not in ids or b not in ids:
        return None
    vectors = column_array(table, "feature").astype(np.float64)
    fa, fb = vectors[ids.index(a)], vectors[ids.index(b)]
    dot = float(fa @ fb)
    return dot / max(float(np.linalg.norm(fa) * np.linalg.norm(fb)), 1e-12) if similarity == "cosine" else dot


def pair_picture(explanation: Explanation) -> Image.Image:
    """Both images as the model saw them, each with its map over it (bright where a region
    adds most to the similarity; where some regions take away, red adds and blue takes away),
    the similarity and the method in the title."""
    pictures, captions = [], []
    signed = bool((explanation.result.maps < 0).any())
    for k, image_id in enumerate((explanation.a, explanation.b)):
        rgb = explanation.inputs[k].permute(1, 2, 0).numpy()
        heat = F.interpolate(explanation.result.maps[k][None, None].float(), size=rgb.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy()
        pictures.append(heat_overlay(rgb, heat, diverging=signed))
        captions.append(f"image {image_id}")
    stored = "" if explanation.stored_similarity is None else f" (stored vectors: {explanation.stored_similarity:.3f})"
    title = (f"{explanation.layer}: similarity {explanation.result.similarity:.3f}{stored}, "
             f"{explanation.result.method}")
    return panel(pictures, captions, title)


def write(rd: RunDir, explanation: Explanation) -> tuple[str, str]:
    """The pair's maps (.npz) and picture (.png); the picture last."""
    e = explanation
    with atomic_path(rd.explained_pair(e.layer, e.a, e.b, "npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, maps_a=e.result.maps[0].numpy(), maps_b=e.result.maps[1].numpy(), similarity=e.result.similarity,
                 method=e.result.method, stored_similarity=np.nan if e.stored_similarity is None else e.stored_similarity)
    with atomic_path(rd.explained_pair(e.layer, e.a, e.b)) as tmp:
        pair_picture(e).save(tmp, format="PNG")
    return str(rd.explained_pair(e.layer, e.a, e.b, "npz")), str(rd.explained_pair(e.layer, e.a, e.b))


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExplainOptions(Options):
    layer: str = option(help="the layer whose similarity is explained, e.g. pool, block13, block13@2x2",
                        required=True)
    pair: str | None = option(help="two image ids: A,B", pattern=r"^[0-9]+,[0-9]+$")
    queries: list[int] = option([], help="explain each of these image ids with its k nearest images in the layer's "
                                         "index (what the report shows)")
    k: int = option(4, help="with queries: neighbours explained per query", min=1, max=50)
    similarity: str = option("cosine", help="the similarity split into maps", choices=SIMILARITIES)
    device: str = option("auto", help="where the model runs", choices=("auto", "cpu", "cuda"))


@dataclass
class ExplainSummary:
    layer: str
    explanations: list[Explanation]
    seconds: float
    retired: int = 0
    unindexed: str = ""  # the index lacks images added since it was built: a nearer one may be among them

    def line(self) -> str:
        if len(self.explanations) == 1:
            e = self.explanations[0]
            stored = "" if e.stored_similarity is None else f" (stored vectors: {e.stored_similarity:.4f})"
            return (f"explain {e.layer}: {e.a} ~ {e.b}: similarity {e.result.similarity:.4f}{stored}, by "
                    f"{e.how}; maps on a {e.result.grid[0]}x{e.result.grid[1]} grid, each summing to "
                    f"{float(e.result.maps[0].sum()):.4f} and {float(e.result.maps[1].sum()):.4f}")
        notes = [f"{plural(self.retired, 'pair')} of older lists deleted" if self.retired else "", self.unindexed]
        return (f"explain {self.layer}: {plural(len(self.explanations), 'pair')} in {self.seconds:.1f}s into "
                f"explain/{self.layer}/" + "".join(f"; {note}" for note in notes if note))


def run(rd: RunDir, options: ExplainOptions) -> ExplainSummary:
    start = time.perf_counter()
    explainer = PairExplainer(rd, options.device)
    if options.pair:
        a, b = (int(v) for v in options.pair.split(","))
        explanation = explainer.explain(a, b, options.layer, options.similarity)
        with one_writer(rd.explain_dir(options.layer), f"explain {options.layer}"):  # beside a job listing queries
            _unlist_if_other(rd, options.layer, a, b, options.similarity)  # before its files change
            write(rd, explanation)
        return ExplainSummary(options.layer, [explanation], time.perf_counter() - start)
    if not options.queries:
        raise ParamError("queries", "or <pair> must be given: the query image ids, or two ids A,B")
    live = [q for q in options.queries if explainer.path(q) is not None]
    if not live:
        raise FeatscopeError(f"none of the query images ({', '.join(map(str, options.queries))}) is in the run")
    with one_writer(rd.explain_dir(options.layer), f"explain {options.layer}"):  # the list vouches for its pairs
        listed = rd.explained_queries(options.layer)
        stamped = derived.stamp(rd, derived.explain_sources(rd, options.layer))  # the index that chose the neighbours
        index = open_index(rd, options.layer)
        if missing := [q for q in live if q not in index]:
            raise not_in_index(rd, options.layer, missing[0])  # before anything of the list before is touched
        withdraw(listed)  # the list of the pairs below: written again last
        derived.forget(listed)
        found = neighbours_of(index, np.array(live, dtype=np.int64), options.k)
        done, pairs = [], {}
        for query, neighbours in zip(live, found.image_ids):
            pairs[str(query)] = []
            for other in (int(n) for n in neighbours if n >= 0):
                explanation = explainer.explain(query, other, options.layer, options.similarity)
                write(rd, explanation)
                done.append(explanation)
                pairs[str(query)].append([other, round(explanation.result.similarity, 4), explanation.result.method])
        retired = _drop_others(rd, options.layer, {(int(q), n[0]) for q, ns in pairs.items() for n in ns})
        write_json_atomic(listed, {"similarity": options.similarity, "pairs": pairs})
        derived.remember(listed, stamped)
        return ExplainSummary(options.layer, done, time.perf_counter() - start, retired,
                              unindexed_note(rd, options.layer, index.ids))


def _unlist_if_other(rd: RunDir, layer: str, a: int, b: int, similarity: str) -> None:
    """Take the pair (a, b) out of the layer's list of explained queries when the list was
    made with another similarity: its files are about to hold this one's maps, which the
    list's numbers would no longer describe."""
    path = rd.explained_queries(layer)
    if not path.exists():
        return
    listed = json.loads(path.read_text())
    pairs = listed["pairs"]
    if listed.get("similarity") == similarity or not any(n[0] == b for n in pairs.get(str(a), [])):
        return
    pairs[str(a)] = [n for n in pairs[str(a)] if n[0] != b]
    write_json_atomic(path, listed)


def _drop_others(rd: RunDir, layer: str, keep: set[tuple[int, int]]) -> int:
    """Delete the layer's pair files other than `keep`: a query's neighbours change with the
    dataset, and an image that left it must not be shown."""
    dropped = 0
    for path in rd.explain_dir(layer).glob("*-*.*"):
        a, _, b = path.name.split(".")[0].partition("-")
        if a.isdigit() and b.isdigit() and (int(a), int(b)) not in keep:
            path.unlink(missing_ok=True)
            dropped += path.suffix == ".png"
    return dropped


def read_queries(rd: RunDir, layer: str) -> dict[int, list]:
    """query -> [[neighbour, similarity, method], ...] the last batch explained, or {}."""
    path = rd.explained_queries(layer)
    return {int(q): v for q, v in json.loads(path.read_text())["pairs"].items()} if path.exists() else {}


COMMANDS = [
    Command("explain", ExplainOptions, run,
            help="why two images are neighbours: a map on each of its regions' share of their similarity",
            description="For a pool of a conv map (global or a grid) the similarity splits exactly over pairs of "
                        "positions (Stylianou et al. 2019) and each map sums to it; for other layers the maps are "
                        "gradient x activation at the last conv block. Writes explain/<layer>/<a>-<b>.npz and "
                        ".png. --queries explains each query with its k nearest images (what the report shows).",
            groups=(Group(("pair", "queries"), required=True),)),
]
