"""Turning images into stored features: the layer taps and what is kept of each layer.

`FeatureExtractor` is used by the extract stage for whole shards and, through
`ImageEmbedder`, by `featscope query --image` and the query service for single new images,
so a new image is embedded exactly as the dataset was.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from featscope.kernels.conv_fusion import fuse_conv_clamps, pack_weights
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerSpec, LayerTap
from featscope.kernels.quantile_sketch import ActivationSketch
from featscope.kernels.summary import conv_summary, pixel_thumbnail
from featscope.pipelines.core.device import PRECISIONS, inference_model, resolve_device, resolve_precision
from featscope.pipelines.core.images import DEFAULT_MAX_PIXELS, BadImage, decode_pixels, read_pixels
from featscope.pipelines.core.models import LoadedModel, load_run_model
from featscope.pipelines.core.store import FLOAT16_MAX

PREDICTED_CLASSES = 5  # the model's top classes kept per image by extract


def summarise(spec: LayerSpec, output: torch.Tensor) -> dict[str, torch.Tensor]:
    """A layer's output -> the tensors stored for it (computed at once, before in-place ops)."""
    if spec.grid:
        if output.ndim != 4:
            raise FeatscopeError(f"layer '{spec.name}': '{spec.module_path}' has no spatial grid to pool "
                                 f"(its output has shape {tuple(output.shape)})")
        return {"feature": F.adaptive_avg_pool2d(output.float(), spec.grid).flatten(1)}
    if spec.kind == "conv" or (spec.kind == "auto" and output.ndim == 4 and output.shape[2] * output.shape[3] > 1):
        s = conv_summary(output)
        return {"feature": s.mean, "max": s.max, "argmax_y": s.argmax_y, "argmax_x": s.argmax_x}
    return {"feature": output.detach().flatten(1).float()}


def storable_rows(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) bool: the images whose stored values of a layer (`summarise`'s columns) are all
    finite and within float16's range, the store's type (a larger value would be kept as
    65,504, not as what the model computed). A NaN or inf anywhere in a conv map reaches its
    mean or its max, so this also says whether the whole map was finite."""
    storable = torch.ones(len(columns["feature"]), dtype=torch.bool, device=columns["feature"].device)
    for name in ("feature", "max"):
        if name in columns:
            storable &= (columns[name].abs() <= FLOAT16_MAX).all(1)  # False for NaN too
    return storable


def checked_vector(vector: np.ndarray, layer: str) -> np.ndarray:
    """A new image's vector, or a one-line error if the model computed NaN or inf for it
    (which an index would rank anywhere, or nowhere)."""
    if not np.isfinite(vector).all():
        raise FeatscopeError(f"the model's {layer} features of this image are not finite numbers (NaN or inf): "
                             "it cannot be compared with the run's images")
    return vector


def extraction_model(loaded: LoadedModel, specs: list[LayerSpec], device: torch.device) -> torch.nn.Module:
    """The module an extraction runs, channels-last: batch norms folded and, on a CPU, each
    conv fused with the clamp after it and the other weights kept packed (forward passes only;
    all leave every tapped layer's output as it is: `kernels.batchnorm_folding`,
    `kernels.conv_fusion`)."""
    model = inference_model(loaded, specs)
    if device.type == "cpu":
        fuse_conv_clamps(model, keep=[spec.module_path for spec in specs if spec.kind != "pixels"])
        pack_weights(model)
    return model.to(device).to(memory_format=torch.channels_last)


class FeatureExtractor:
    """A model with its layer taps, ready to turn uint8 batches into stored summaries."""

    def __init__(self, loaded: LoadedModel, layers: list[str], device: torch.device, precision: str):
        self.loaded, self.device, self.precision = loaded, device, precision
        self.specs = [loaded.layer(name) for name in layers]
        self.model = extraction_model(loaded, self.specs, device)
        self.cells: dict[str, int] = {}  # values per unit per image in each layer's whole output
        probe = self(torch.zeros((1, 3, loaded.preprocessing.crop, loaded.preprocessing.crop), dtype=torch.uint8))
        self.kinds = {name: "conv" if "max" in out else "vector" for name, out in probe.items()}
        self.dims = {name: out["feature"].shape[1] for name, out in probe.items()}

    def __call__(self, pixels: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
        """(B,3,H,W) uint8 -> {layer: {column: (B, D) array}}."""
        return {name: {k: v.cpu().numpy() for k, v in cols.items()} for name, cols in self.forward(pixels).items()}

    def forward(self, pixels: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """(B,3,H,W) uint8 -> {layer: {column: (B, D) tensor on the model's device}}."""
        return self.forward_with_predictions(pixels)[0]

    @torch.inference_mode()
    def forward_with_predictions(self, pixels: torch.Tensor, top: int = PREDICTED_CLASSES,
                                 sketches: dict[str, ActivationSketch] | None = None
                                 ) -> tuple[dict[str, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor] | None]:
        """As `forward`, plus the model's `top` classes and their softmax probabilities, (B, top)
        each: the taps run the whole model, so its output comes free (None for pixels only, or
        a model whose output is not a (B, classes) score). `sketches` (layer -> sketch) count
        every value of those layers' whole outputs, before they are summarised, for the images
        whose values there can be stored (`storable_rows`)."""
        pixels = pixels.to(self.device, non_blocking=True)
        x = self.loaded.preprocessing.normalize(pixels)
        x = x.contiguous(memory_format=torch.channels_last)
        captured: dict[str, dict[str, torch.Tensor]] = {}

        def keep(spec: LayerSpec, output: torch.Tensor) -> None:
            captured[spec.name] = summarise(spec, output)
            self.cells.setdefault(spec.name, output[0].numel() // output.shape[1])
            if sketches and spec.name in sketches:
                whole = output.ndim == 4 and not spec.grid  # a pooled grid's units are its pooled cells
                values = output if whole else captured[spec.name]["feature"]
                kept = storable_rows(captured[spec.name])  # a NaN or inf would break its unit's range
                sketches[spec.name].update(values if bool(kept.all()) else values[kept])

        for spec in self.specs:
            if spec.kind == "pixels":
                captured[spec.name] = {"feature": pixel_thumbnail(pixels)}
        dtype = PRECISIONS[self.precision]
        predictions = None
        if any(spec.kind != "pixels" for spec in self.specs):
            with LayerTap(self.model, self.specs, keep), torch.autocast(self.device.type, enabled=dtype is not None,
                                                                          dtype=dtype or torch.float32):
                output = self.model(x)
            if isinstance(output, torch.Tensor) and output.ndim == 2:
                probabilities, classes = output.float().softmax(1).topk(min(top, output.shape[1]), dim=1)
                predictions = (classes, probabilities)
        return captured, predictions



class ImageEmbedder:
    """The run's model, loaded on first use, turning one new image into its stored vector
    at a layer. Thread-safe: the model runs under a lock."""

    def __init__(self, config: dict, layers: list[str], *, device: str = "auto", copies: int = 1):
        self.config, self.layers, self.device, self.copies = config, list(layers), device, copies
        self._extractor: FeatureExtractor | None = None
        self._spares: list[FeatureExtractor] = []  # the other copies, for `replica`
        self._lock = threading.Lock()  # held while the model runs
        self._loading = threading.Lock()  # held while it loads: decoding must not wait for a forward pass

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded (it loads on the first use)."""
        return self._extractor is not None

    @property
    def extractor(self) -> FeatureExtractor:
        """The model, loaded on first use; does not wait while the model runs (decoders read
        its preprocessing while it embeds)."""
        if self._extractor is None:
            with self._loading:
                if self._extractor is None:
                    loaded = load_run_model(self.config, require_features=True)
                    device = resolve_device(self.device)
                    # the precision the run's features were extracted in (see extract), so a new
                    # image is embedded as the dataset was; runs from before it was recorded: auto
                    precision = resolve_precision(self.config.get("precision", "auto"), device)
                    copies = [FeatureExtractor(loaded, self.layers, device, precision) for _ in range(self.copies)]
                    self._spares, self._extractor = copies[1:], copies[0]
        return self._extractor

    def replica(self) -> ImageEmbedder:
        """Another embedder on one of this one's other `copies` of the model (same weights and
        preprocessing), for forward passes on another thread at the same time: the layer taps
        are hooks on a model's modules, so two passes cannot share one model. The copies are
        made together when the model loads, before any forward pass: making one folds its
        batch norms through a torch.fx trace, which patches `nn.Module.__call__` for the
        whole process while it runs."""
        self.extractor  # loads the model and its copies
        if not self._spares:
            raise RuntimeError(f"all {self.copies} copies of the model are taken")
        twin = ImageEmbedder(self.config, self.layers, device=self.device)
        twin._extractor = self._spares.pop()
        return twin

    def pixels(self, source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """A file path or encoded bytes -> (3,H,W) uint8; a bad image is a one-line error.
        An image declaring more than `max_pixels` is refused from its header, undecoded."""
        min_size = self.extractor.loaded.preprocessing.resize
        try:
            if isinstance(source, bytes):
                return decode_pixels(source, min_size=min_size, max_pixels=max_pixels)
            return read_pixels(source, min_size=min_size, max_pixels=max_pixels)
        except BadImage as e:
            if isinstance(source, bytes):
                raise FeatscopeError(f"not a readable image: {e}") from None
            raise FeatscopeError(f"cannot read {source}: {e}") from None

    def model_input(self, source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decoded, resized and cropped as the run's preprocessing does: (3, crop, crop) uint8.
        Runs outside the model's lock, so many uploads decode at once."""
        return self.extractor.loaded.preprocessing.to_uint8(self.pixels(source, max_pixels=max_pixels))

    def embed_batch(self, inputs: torch.Tensor) -> dict[str, np.ndarray]:
        """(B, 3, crop, crop) uint8 model inputs -> {layer: (B, D) vectors}, one forward pass."""
        extractor = self.extractor
        with self._lock:
            out = extractor(inputs)
        return {layer: out[layer]["feature"] for layer in self.layers}

    def embed(self, source: str | Path | bytes, layer: str) -> np.ndarray:
        """The vector of a new image at `layer`, by the run's model, weights and preprocessing."""
        return self.embed_batch(self.model_input(source)[None])[layer][0]
