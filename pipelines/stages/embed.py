"""Stage `embed`: 2-D maps of a layer's feature space, by PCA and by t-SNE (openTSNE).

PCA is fitted on a sample and applied shard by shard; it gives the 2-D PCA map and the
50-d input of t-SNE. openTSNE runs with FFT gradients on all cores from a PCA
initialisation, seeded, so the same input gives the same map. Above `max_exact` points it
follows openTSNE's own large-data recipe: embed a sample, then place the other points into
that map (`prepare_partial`) and optimise them. The map's trustworthiness (sklearn) and,
where labels exist, the 10-NN label accuracy in 2-D are printed and stored as metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from openTSNE import TSNE
from sklearn.manifold import trustworthiness
from sklearn.neighbors import KNeighborsClassifier

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path
from featscope.pipelines.core.options import Command, Options, option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import EMBEDDING_SCHEMA, RunIdentity, iter_features


@dataclass
class EmbedSummary:
    layer: str
    points: int
    trustworthiness: float
    knn_accuracy: float | None
    sampled: bool
    seconds: float

    def line(self) -> str:
        acc = f", 10-NN label accuracy in 2-D {self.knn_accuracy:.3f}" if self.knn_accuracy is not None else ""
        how = " (sample embedded, the rest placed into it)" if self.sampled else ""
        return (f"embed {self.layer}: {self.points} points{how}; trustworthiness {self.trustworthiness:.3f}{acc}; "
                f"{self.seconds:.1f}s")


def fit_pca(sample: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components (dims, D)) of a sample, by SVD."""
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    return mean, vt[:dims]


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


def tsne(x: np.ndarray, *, perplexity: float, seed: int, max_exact: int) -> tuple[np.ndarray, bool]:
    """openTSNE map of x; above max_exact points, a sample's map with the rest placed into it."""
    perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3))
    model = TSNE(perplexity=perplexity, n_jobs=-1, negative_gradient_method="fft", initialization="pca",
                 random_state=seed, verbose=False)
    if len(x) <= max_exact:
        return np.asarray(model.fit(x), dtype=np.float32), False
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), max_exact, replace=False))
    rest = np.setdiff1d(np.arange(len(x)), sample)
    embedding = model.fit(x[sample])
    placed = embedding.prepare_partial(x[rest], initialization="median", k=25)
    placed = placed.optimize(n_iter=250, learning_rate=0.1, momentum=0.8)
    out = np.empty((len(x), 2), np.float32)
    out[sample], out[rest] = np.asarray(embedding), np.asarray(placed)
    return out, True


def quality(x: np.ndarray, y2: np.ndarray, labels: list | None, *, sample: int = 5000,
            seed: int = 0) -> tuple[float, float | None]:
    """Trustworthiness of the 2-D map (k=10) and 10-NN label accuracy in it, on a sample."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    trust = float(trustworthiness(x[idx], y2[idx], n_neighbors=min(10, max(1, len(idx) // 2 - 1))))
    if not labels or all(label is None for label in labels):
        return trust, None
    lab = np.array(["" if label is None else str(label) for label in labels])
    knn = KNeighborsClassifier(n_neighbors=min(11, len(y2))).fit(y2, lab)
    neighbours = knn.kneighbors(y2[idx], return_distance=False)[:, 1:]  # leave the point itself out
    votes = [max(set(lab[n]), key=list(lab[n]).count) == lab[i] for i, n in zip(idx, neighbours)]
    return trust, float(np.mean(votes))


def embed(rd: RunDir, layer: str, *, pca_dims: int = 50, perplexity: float = 30.0, seed: int = 0,
        max_exact: int = 100_000) -> EmbedSummary:
    """Write embedding/<layer>.parquet (image_id, tsne_x, tsne_y, pca_x, pca_y)."""
    start = time.perf_counter()
    ids, x = read_layer(rd, layer)
    if len(ids) < 5:
        raise FeatscopeError(f"t-SNE needs at least 5 images, layer '{layer}' has {len(ids)}")
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(len(x), min(len(x), 50_000), replace=False))
    mean, components = fit_pca(x[fit_rows], min(pca_dims, x.shape[1], len(fit_rows)))
    reduced = ((x - mean) @ components.T).astype(np.float32)
    coords, sampled = tsne(reduced, perplexity=perplexity, seed=seed, max_exact=max_exact)
    labels_by_id = {r["image_id"]: r["label"] for r in manifest.read(rd).to_pylist()}
    trust, accuracy = quality(x, coords, [labels_by_id.get(int(i)) for i in ids], seed=seed)
    table = pa.table({"image_id": ids, "tsne_x": coords[:, 0], "tsne_y": coords[:, 1],
                      "pca_x": reduced[:, 0], "pca_y": reduced[:, 1] if reduced.shape[1] > 1 else 0 * reduced[:, 0]},
                     schema=EMBEDDING_SCHEMA)
    identity = RunIdentity.of_run(rd.read_config())
    meta = identity.metadata(layer=layer, pca_dims=int(components.shape[0]), perplexity=perplexity, seed=seed,
                             trustworthiness=round(trust, 4), knn_accuracy_2d=accuracy, sampled=sampled)
    with atomic_path(rd.embedding(layer)) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp, write_page_checksum=True)
    return EmbedSummary(layer, len(ids), trust, accuracy, sampled, time.perf_counter() - start)


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbedOptions(Options):
    layer: str = option(help="an extracted layer", required=True)
    pca_dims: int = option(50, help="PCA dimensions t-SNE starts from", min=2)
    perplexity: float = option(30.0, help="t-SNE perplexity", min=1)
    seed: int = option(0, help="seed of the PCA sample and t-SNE")
    max_exact: int = option(100_000, help="above this many images, embed a sample and place the rest into its map",
                            min=100)


def run(rd: RunDir, options: EmbedOptions) -> EmbedSummary:
    return embed(rd, options.layer, pca_dims=options.pca_dims, perplexity=options.perplexity, seed=options.seed,
                 max_exact=options.max_exact)


COMMANDS = [
    Command("embed", EmbedOptions, run, help="2-D maps of a layer by PCA and t-SNE (openTSNE)",
            description="PCA (fitted on a sample) to --pca-dims, then seeded openTSNE with FFT gradients. Prints "
                        "trustworthiness and 10-NN label accuracy in 2-D."),
]
