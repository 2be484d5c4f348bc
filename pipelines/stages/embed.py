"""Stage `embed`: 2-D maps of a layer's feature space, by PCA and by t-SNE (openTSNE).

PCA is fitted on a sample and applied shard by shard; it gives the 2-D PCA map and the
50-d input of t-SNE. openTSNE runs with FFT gradients (Barnes-Hut under 1,000 points,
where the FFT grid's fixed cost dominates) on all cores from a PCA
initialisation, seeded, so the same input gives the same map. Above `max_exact` points it
follows openTSNE's own large-data recipe: embed a sample, then place the other points into
that map (`prepare_partial`) and optimise them. The map's trustworthiness and,
where labels exist, the 10-NN label accuracy in 2-D are printed and stored as metadata.

Scheduled reruns keep the map: its state (PCA, ids, positions) is stored beside it
(embedding/<layer>.pca.npz), new
images are placed into the previous map by the same recipe with every old point fixed, and
retired ones simply leave. A full fit happens on `--refit` or once the images number more
than `--refit-growth` times those of the last fit still in the dataset (growth, or a dataset
whose images were mostly replaced: placing them all around the few left would draw a map of
the old data, not of the new); PCA signs are fixed and the new map
is rotated onto the old one (Procrustes), and how far the old points moved is printed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse
from scipy.linalg import orthogonal_procrustes
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, file_digest, one_writer
from featscope.pipelines.core.options import Command, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import EMBEDDING_SCHEMA, RunIdentity, iter_features, part_stamp
from featscope.pipelines.core.text import plural

if TYPE_CHECKING:  # openTSNE (and scikit-learn, which it imports: 2 s) only where a map is fitted or points placed
    from openTSNE import TSNE, TSNEEmbedding

REFIT_GROWTH = 2.0  # a map is fitted anew once the images number this many times those of its fit still live
QUALITY_DROP = 0.05  # a placement whose map measures this much worse than at its fit suggests a refit


@dataclass
class EmbedSummary:
    layer: str
    points: int
    trustworthiness: float
    knn_accuracy: float | None
    sampled: bool
    seconds: float
    how: str = "fitted"  # "fitted", "placed" (new points into the kept map) or "refitted" (and aligned)
    placed: int = 0
    displacement: float | None = None  # old points' mean shift, share of the map's diagonal
    reason: str = ""  # why a map was refitted without --refit
    again: int = 0  # of those placed, images whose features were extracted again (their old place dropped)
    at_fit: dict | None = None  # a placement's map: its trustworthiness and label accuracy when it was fitted

    def _measured(self, name: str, label: str, value: float) -> str:
        then = (self.at_fit or {}).get(name)
        return f"{label} {value:.3f}" + (f" ({then:.3f} at its fit)" if then is not None else "")

    def _fell(self) -> bool:
        """Whether a placement's map measures clearly worse than when it was fitted."""
        now = {"trustworthiness": self.trustworthiness, "knn_accuracy": self.knn_accuracy}
        return any(then is not None and now[name] is not None and now[name] < then - QUALITY_DROP
                   for name, then in (self.at_fit or {}).items())

    def line(self) -> str:
        acc = f", {self._measured('knn_accuracy', '10-NN label accuracy in 2-D', self.knn_accuracy)}" \
            if self.knn_accuracy is not None else ""
        how = " (sample embedded, the rest placed into it)" if self.sampled else ""
        if self.how == "placed":
            again = f", {self.again} of them extracted again since" if self.again else ""
            how = f" ({self.placed} new placed into the previous map{again}, old points fixed)"
        elif self.how == "refitted":
            how = f" (refitted{': ' + self.reason if self.reason else ''}; aligned to the previous map)"
        moved = f"; old points moved {100 * self.displacement:.2f}% of the map's diagonal" \
            if self.displacement is not None else ""
        fell = ("; it measures worse than when it was fitted (images placed into a map of others, new kinds of "
                "images perhaps): `--refit` fits it anew on all of them") if self._fell() else ""
        return (f"embed {self.layer}: {self.points} points{how}; "
                f"{self._measured('trustworthiness', 'trustworthiness', self.trustworthiness)}{acc}{moved}{fell}; "
                f"{self.seconds:.1f}s")


def fit_pca(sample: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components (dims, D)) of a sample, by SVD. Each component's sign is fixed (its
    largest loading positive), so a refit on similar data does not mirror the map."""
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    vt = vt[:dims]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    return mean, vt * np.where(signs == 0, 1, signs)[:, None]


def read_layer(rd: RunDir, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """All (image_ids, float32 features) of a layer, without removed images, shard by shard."""
    identity = RunIdentity.of_run(rd.read_config())
    parts = manifest.feature_parts(rd, layer)
    present = manifest.read(rd)["image_id"].to_numpy()
    ids, chunks = [], []
    for batch_ids, values in iter_features(parts, identity):
        keep = np.isin(batch_ids, present)
        ids.append(batch_ids[keep])
        chunks.append(values[keep].astype(np.float32))
    return np.concatenate(ids), np.concatenate(chunks)


def _gradient_method(n: int) -> str:
    """FFT-interpolated gradients, whose cost is flat in n but has a floor of seconds;
    Barnes-Hut below 1,000 points, where it takes milliseconds."""
    return "fft" if n >= 1000 else "bh"


BAR_EVERY = 10  # iterations between bar updates; each evaluates the KL error (not the map's path)


class IterationBar:
    """An openTSNE callback that advances a progress bar (a disabled one too: no output) by
    BAR_EVERY. It always returns False: openTSNE stops optimising when a callback returns
    True (and tqdm's `update` returns True whenever it redraws)."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def __call__(self, iteration: int, error: float, embedding: np.ndarray) -> bool:
        self.bar.update(BAR_EVERY)
        return False


def _tsne_model(perplexity: float, seed: int, n: int, bar: tqdm) -> TSNE:
    from openTSNE import TSNE

    return TSNE(perplexity=perplexity, n_jobs=-1, negative_gradient_method=_gradient_method(n),
                initialization="pca", random_state=seed, verbose=False, callbacks=IterationBar(bar),
                callbacks_every_iters=BAR_EVERY)


def _perplexity(perplexity: float, n: int) -> float:
    return min(perplexity, max(2.0, (n - 1) / 3))


PLACE_ITERATIONS = 250


def _place(embedding: TSNEEmbedding, x_new: np.ndarray, bar: tqdm) -> np.ndarray:
    """openTSNE's recipe for new points: start each at the median of its 25 nearest reference
    points, then optimise them alone with the reference map held fixed."""
    placed = embedding.prepare_partial(x_new, initialization="median", k=min(25, len(embedding)))
    return np.asarray(placed.optimize(n_iter=PLACE_ITERATIONS, learning_rate=0.1, momentum=0.8,
                                      callbacks=IterationBar(bar), callbacks_every_iters=BAR_EVERY), dtype=np.float32)


def tsne(x: np.ndarray, *, perplexity: float, seed: int, max_exact: int,
         progress: bool = False) -> tuple[np.ndarray, bool]:
    """openTSNE map of x; above max_exact points, a sample's map with the rest placed into it.
    `progress`: a bar over openTSNE's iterations (the map is the same with or without)."""
    sampled = len(x) > max_exact
    with tqdm(desc="t-SNE", unit="it", disable=not progress) as bar:
        model = _tsne_model(_perplexity(perplexity, len(x)), seed, min(len(x), max_exact), bar)
        bar.total = model.early_exaggeration_iter + model.n_iter + (PLACE_ITERATIONS if sampled else 0)
        if not sampled:
            return np.asarray(model.fit(x), dtype=np.float32), False
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(x), max_exact, replace=False))
        rest = np.setdiff1d(np.arange(len(x)), sample)
        embedding = model.fit(x[sample])
        out = np.empty((len(x), 2), np.float32)
        out[sample], out[rest] = np.asarray(embedding), _place(embedding, x[rest], bar)
        return out, True


class ReferenceNeighbours:
    """The part of openTSNE's affinities that placing new points uses (`to_new`: each new
    point's perplexity-calibrated affinities to its nearest reference points), over an exact
    FAISS search, without computing the reference points' own affinities as
    `PerplexityBasedNN` would: 8.5 s of 10 for 200 new points into a 20k map here. The
    affinities equal `PerplexityBasedNN(method="exact").to_new`'s (tested)."""

    def __init__(self, reference: np.ndarray, perplexity: float, n_jobs: int = -1):
        self.n_samples, self.perplexity, self.n_jobs = len(reference), perplexity, n_jobs
        self.P = scipy.sparse.csr_matrix((self.n_samples, self.n_samples))  # shape only: TSNEEmbedding checks it
        self.index = faiss.IndexFlatL2(reference.shape[1])
        self.index.add(np.ascontiguousarray(reference, dtype=np.float32))

    def to_new(self, data: np.ndarray, perplexity: float | None = None, return_distances: bool = False,
               k_neighbors: int | str = "auto"):
        from openTSNE.affinity import joint_probabilities_nn

        perplexity = perplexity or self.perplexity
        k = min(self.n_samples, int(3 * perplexity)) if k_neighbors == "auto" else int(k_neighbors)
        squared, neighbours = self.index.search(np.ascontiguousarray(data, dtype=np.float32), k)
        distances = np.sqrt(np.maximum(squared, 0))
        p = joint_probabilities_nn(neighbours, distances, [min(perplexity, k / 3)], symmetrize=False,
                                   normalization="point-wise", n_reference_samples=self.n_samples, n_jobs=self.n_jobs)
        return (p, neighbours, distances) if return_distances else p


def place_into(reference_x: np.ndarray, reference_map: np.ndarray, x_new: np.ndarray, *, perplexity: float,
               seed: int, max_reference: int, progress: bool = False) -> np.ndarray:
    """Map positions for `x_new` in an existing map whose points (`reference_x` at
    `reference_map`) stay where they are; up to `max_reference` of them (a seeded sample) serve
    as the reference."""
    if len(reference_x) > max_reference:
        keep = np.sort(np.random.default_rng(seed).choice(len(reference_x), max_reference, replace=False))
        reference_x, reference_map = reference_x[keep], reference_map[keep]
    from openTSNE import TSNEEmbedding

    affinities = ReferenceNeighbours(reference_x, _perplexity(perplexity, len(reference_x)))
    embedding = TSNEEmbedding(np.ascontiguousarray(reference_map, dtype=np.float64), affinities,
                              negative_gradient_method=_gradient_method(len(reference_x)), random_state=seed)
    with tqdm(total=PLACE_ITERATIONS, desc="t-SNE placing", unit="it", disable=not progress) as bar:
        return _place(embedding, x_new, bar)


def align(points: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`points` moved by the rotation (or mirror) and shift that best take `source` onto
    `target` (the same points in two maps; orthogonal Procrustes). t-SNE's scale is kept."""
    rotation, _ = orthogonal_procrustes(source - source.mean(axis=0), target - target.mean(axis=0))
    return ((points - source.mean(axis=0)) @ rotation + target.mean(axis=0)).astype(np.float32)


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions of `wanted` ids (all present) in `ids`."""
    order = np.argsort(ids, kind="stable")
    return order[np.searchsorted(ids, wanted, sorter=order)]


def displacement(before: np.ndarray, after: np.ndarray) -> float:
    """Mean distance each point moved, as a share of the diagonal of the `before` map."""
    diagonal = float(np.linalg.norm(before.max(axis=0) - before.min(axis=0))) or 1.0
    return float(np.linalg.norm(after - before, axis=1).mean() / diagonal)


def trustworthiness(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Trustworthiness of the map y of x (Venna & Kaski 2001): 1 - 2/(nk(2n-3k-1)) times the
    sum over each point's k map neighbours that are not among its k nearest in x of (their
    rank in x - k). The value of sklearn.manifold.trustworthiness (tested), but it ranks only
    those few neighbours in chunked distance rows instead of sorting every row: 0.3 s
    instead of 4 s for 5,000 points here."""
    n = len(x)
    x = np.asarray(x, dtype=np.float64)
    norms = np.einsum("ij,ij->i", x, x)
    flat = faiss.IndexFlatL2(y.shape[1])
    flat.add(np.ascontiguousarray(y, dtype=np.float32))
    _, near = flat.search(np.ascontiguousarray(y, dtype=np.float32), k + 1)
    map_neighbours = np.array([[j for j in row if j != i][:k] for i, row in enumerate(near)])
    total = 0
    for start in range(0, n, 512):
        rows = np.arange(start, min(start + 512, n))
        d = norms[rows, None] + norms[None, :] - 2.0 * (x[rows] @ x.T)  # squared: the same order
        d[np.arange(len(rows)), rows] = np.inf
        to_neighbours = np.take_along_axis(d, map_neighbours[rows], axis=1)  # (rows, k)
        ranks = 1 + (d[:, None, :] < to_neighbours[:, :, None]).sum(axis=2)
        total += int(np.maximum(ranks - k, 0).sum())
    return 1.0 - total * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))


def quality(x: np.ndarray, y2: np.ndarray, labels: list | None, *, sample: int = 5000,
            seed: int = 0) -> tuple[float, float | None]:
    """Trustworthiness of the 2-D map (k=10) and 10-NN label accuracy in it, on a sample.
    A tied vote goes to the label of the nearest of the tied neighbours (never to set order)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    trust = trustworthiness(x[idx], y2[idx], k=min(10, max(1, len(idx) // 2 - 1)))
    if not labels or all(label is None for label in labels):
        return trust, None
    lab = np.array(["" if label is None else str(label) for label in labels])
    flat = faiss.IndexFlatL2(2)
    flat.add(np.ascontiguousarray(y2, dtype=np.float32))
    _, near = flat.search(np.ascontiguousarray(y2[idx], dtype=np.float32), min(11, len(y2)))
    votes = [majority(lab[[j for j in row if j != i and j >= 0][:10]].tolist()) == lab[i] for i, row in zip(idx, near)]
    return trust, float(np.mean(votes))


def majority(labels_nearest_first: list[str]) -> str:
    """The most frequent label; a tie goes to the tied label met first (the nearest)."""
    counts = Counter(labels_nearest_first)
    top = max(counts.values())
    return next(label for label in labels_nearest_first if counts[label] == top)


class PreviousMap(NamedTuple):
    ids: np.ndarray
    coords: np.ndarray  # (N, 2) t-SNE
    mean: np.ndarray
    components: np.ndarray
    fitted_ids: np.ndarray | None  # the images of the last full fit (None: a state from before, unknown)
    at_fit: dict | None  # the map's trustworthiness and label accuracy when it was fitted (None: not recorded)
    feature_parts: dict  # part name -> `part_stamp` of the parts it was made from ({}: not recorded)


def _previous_map(rd: RunDir, layer: str, identity: RunIdentity, settings: dict) -> PreviousMap | None:
    """The layer's last map and its PCA, from embedding/<layer>.pca.npz, if made by this
    model with these settings. The .npz holds the whole state (the workflow deletes the
    Parquet map before embed reruns, as it does every job's outputs)."""
    path = rd.embedding_pca(layer)
    if not path.exists():
        return None
    try:
        with np.load(path) as state:
            if (json.loads(str(state["settings"])) != settings
                    or json.loads(str(state["identity"])) != asdict(identity)):
                return None
            if "fitted_ids" in state:
                fitted = state["fitted_ids"]
            else:  # from before fitted ids were kept: known only if nothing was placed since the fit
                fitted = state["ids"] if len(state["ids"]) == int(state["fitted_points"]) else None
            at_fit = json.loads(str(state["at_fit"])) if "at_fit" in state else None
            parts = json.loads(str(state["feature_parts"])) if "feature_parts" in state else {}
            return PreviousMap(state["ids"], state["coords"], state["mean"], state["components"], fitted, at_fit,
                               parts)
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from before: a fresh fit replaces it


def embed(rd: RunDir, layer: str, *, pca_dims: int = 50, perplexity: float = 30.0, seed: int = 0,
          max_exact: int = 100_000, refit: bool = False, refit_growth: float = REFIT_GROWTH,
          progress: bool = True) -> EmbedSummary:
    """Write embedding/<layer>.parquet (image_id, tsne_x, tsne_y, pca_x, pca_y) and the PCA
    beside it. With a previous map of the same settings, new images are placed into it and
    the old points keep their places; a full fit happens on `refit`, or once the images
    number more than `refit_growth` times those of the map's last fit that are still there,
    and is then aligned to the previous map."""
    start = time.perf_counter()
    ids, x = read_layer(rd, layer)
    if len(ids) < 5:
        raise FeatscopeError(f"t-SNE needs at least 5 images, layer '{layer}' has {len(ids)}")
    identity = RunIdentity.of_run(rd.read_config())
    settings = {"pca_dims": pca_dims, "perplexity": perplexity, "seed": seed, "max_exact": max_exact}
    previous = _previous_map(rd, layer, identity, settings)
    stamps = {p.name: part_stamp(p) for p in manifest.feature_parts(rd, layer)}
    # a part written again since (its shard extracted again) may hold other values: its
    # images lose their old places and are placed anew
    again = np.zeros(len(ids), bool)
    if previous is not None:
        for name in (n for n, stamp in previous.feature_parts.items() if stamps.get(n, stamp) != stamp):
            again |= np.isin(ids, pq.read_table(rd.root / "features" / layer / name, columns=["image_id"])["image_id"])
    kept = (np.isin(ids, previous.ids) & ~again) if previous is not None else np.zeros(len(ids), bool)
    how, moved, sampled = "fitted", None, False
    reason = "" if previous is None or refit else _refit_reason(previous, ids, kept, refit_growth)
    if previous is not None and not refit and not reason:
        how, mean, components = "placed", previous.mean, previous.components
        fitted_ids = ids[np.isin(ids, previous.fitted_ids)]  # placed anew or not, they shaped the fit
        reduced = ((x - mean) @ components.T).astype(np.float32)
        coords = np.empty((len(ids), 2), np.float32)
        coords[kept] = previous.coords[_rows_of(previous.ids, ids[kept])]
        if (~kept).any():
            coords[~kept] = place_into(reduced[kept], coords[kept], reduced[~kept], perplexity=perplexity, seed=seed,
                                       max_reference=max_exact, progress=progress)
        moved = 0.0
    else:
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(len(x), min(len(x), 50_000), replace=False))
        mean, components = fit_pca(x[fit_rows], min(pca_dims, x.shape[1], len(fit_rows)))
        reduced = ((x - mean) @ components.T).astype(np.float32)
        coords, sampled = tsne(reduced, perplexity=perplexity, seed=seed, max_exact=max_exact, progress=progress)
        fitted_ids = ids
        if previous is not None and kept.sum() >= 3:
            how = "refitted"
            before = previous.coords[_rows_of(previous.ids, ids[kept])]
            coords = align(coords, coords[kept], before)  # fitted on the kept points, moves them all
            moved = displacement(before, coords[kept])
    labels_by_id = {r["image_id"]: r["label"] for r in manifest.read(rd).to_pylist()}
    trust, accuracy = quality(x, coords, [labels_by_id.get(int(i)) for i in ids], seed=seed)
    at_fit = previous.at_fit if how == "placed" else {"trustworthiness": trust, "knn_accuracy": accuracy}
    table = pa.table({"image_id": ids, "tsne_x": coords[:, 0], "tsne_y": coords[:, 1],
                      "pca_x": reduced[:, 0], "pca_y": reduced[:, 1] if reduced.shape[1] > 1 else 0 * reduced[:, 0]},
                     schema=EMBEDDING_SCHEMA)
    # the state and the map, one job's pair: two embeds of a layer at once write in turn
    with one_writer(rd.embedding(layer).parent, f"embed {layer}"):
        with atomic_path(rd.embedding_pca(layer)) as tmp:  # the state a rerun starts from
            with open(tmp, "wb") as f:
                np.savez(f, mean=mean.astype(np.float32), components=components.astype(np.float32), ids=ids,
                         coords=coords, fitted_ids=fitted_ids, fitted_points=len(fitted_ids),
                         at_fit=json.dumps(at_fit), feature_parts=json.dumps(stamps, sort_keys=True),
                         settings=json.dumps(settings, sort_keys=True),
                         identity=json.dumps(asdict(identity), sort_keys=True))
            pca_sha256 = file_digest(tmp)  # what this job wrote: the file in place may be another job's by now
        meta = identity.metadata(layer=layer, pca_dims=int(components.shape[0]), perplexity=perplexity, seed=seed,
                                 trustworthiness=round(trust, 4), knn_accuracy_2d=accuracy, sampled=sampled,
                                 settings=json.dumps(settings, sort_keys=True), fitted_points=len(fitted_ids),
                                 pca_sha256=pca_sha256, how=how,
                                 displacement=None if moved is None else round(moved, 6))
        with atomic_path(rd.embedding(layer)) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), tmp, write_page_checksum=True)
    placing = how == "placed"
    return EmbedSummary(layer, len(ids), trust, accuracy, sampled, time.perf_counter() - start, how,
                        placed=int((~kept).sum()) if placing else 0, displacement=moved,
                        reason=reason if how == "refitted" else "", again=int(again.sum()) if placing else 0,
                        at_fit=at_fit if placing else None)


def _refit_reason(previous: PreviousMap, ids: np.ndarray, kept: np.ndarray, refit_growth: float) -> str:
    """Why the previous map cannot take the new images by placement ("" if it can): a map is
    the picture of the images it was fitted on, and placing many times more images around
    them (a dataset that grew, or whose images were mostly replaced) draws the old data."""
    if kept.sum() < 5:
        return f"only {int(kept.sum())} of its images are left"
    if previous.fitted_ids is None:
        return "its state does not say which images it was fitted on (written by an older featscope)"
    fitted = int(np.isin(ids, previous.fitted_ids).sum())
    if len(ids) > refit_growth * fitted:
        return (f"{plural(fitted, 'image')} of its last fit left among {len(ids)}, fewer than 1 in "
                f"{refit_growth:g} (--refit-growth)")
    return ""


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbedOptions(Options):
    layer: str = option(help="an extracted layer", required=True)
    pca_dims: int = option(50, help="PCA dimensions t-SNE starts from", min=2)
    perplexity: float = option(30.0, help="t-SNE perplexity", min=1)
    seed: int = seed_option(0, help="seed of the PCA sample and t-SNE")
    max_exact: int = option(100_000, help="above this many images, embed a sample and place the rest into its map",
                            min=100)
    refit: bool = option(False, help="fit the map anew (aligned to the previous one) instead of placing new images "
                                     "into it")
    refit_growth: float = option(REFIT_GROWTH, help="fit anew once the images number this many times those of the "
                                                    "map's last fit still in the dataset (growth or replacement)",
                                 min=1)


def run(rd: RunDir, options: EmbedOptions, progress: bool = True) -> EmbedSummary:
    return embed(rd, options.layer, pca_dims=options.pca_dims, perplexity=options.perplexity, seed=options.seed,
                 max_exact=options.max_exact, refit=options.refit, refit_growth=options.refit_growth,
                 progress=progress)


COMMANDS = [
    Command("embed", EmbedOptions, run, help="2-D maps of a layer by PCA and t-SNE (openTSNE)",
            description="PCA (fitted on a sample) to --pca-dims, then seeded openTSNE with FFT gradients. Prints "
                        "trustworthiness and 10-NN label accuracy in 2-D. A rerun places new images into the "
                        "previous map (old points fixed) until the images number more than --refit-growth times "
                        "those of its last fit still in the dataset (it grew, or most images were replaced), or "
                        "on --refit."),
]
