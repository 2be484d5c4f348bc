"""A model's float32 forward pass in ONNX Runtime, for CPU work that only runs the whole
model forward: the deletion and insertion curves, many perturbed copies of each image
(occlusion runs the model from a cut block and stays in PyTorch). ONNX Runtime fuses each
conv with its activation and picks its CPU kernels by shape: on MobileNet-V2 at 192 px, one
thread, it took 17.3 ms a batch of 4 against 28.3 ms for PyTorch's eager pass of the same
folded, channels-last model (4.0 against 8.1 at batch 1), with outputs equal to 1e-5.
`benchmarks/saliency_bench.py` times both.

Gradients, autocast and GPUs stay with PyTorch: `fast_forward` returns the PyTorch model
wherever ONNX Runtime would not do the same work (or is not installed, or the export fails).
"""

from __future__ import annotations

import io
import logging
import threading
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)


class OnnxForward(nn.Module):
    """`model`'s forward pass as an ONNX Runtime session, called like the model: (B,3,H,W)
    float32 in, the model's output as a float32 tensor out. Batch, height and width may vary.
    The first input of each height and width is checked against `model` (one image): a shape
    the exported graph does not carry faithfully runs in PyTorch from then on, with a warning.
    One session serves every thread (its run is thread-safe and releases the GIL), so a copy
    is the same object."""

    def __init__(self, model: nn.Module, example: torch.Tensor, threads: int):
        super().__init__()
        import onnxruntime

        self._pytorch = (model.eval(),)  # not a submodule: callers must not lay inputs out for its convs
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(model, (example.contiguous(),), buffer, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}},
                              dynamo=False, opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 1: runs on the calling thread (a lane, a Dask worker)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self._checked: dict[tuple[int, int], bool] = {}  # (H, W) -> whether the session agrees with the model
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (int(x.shape[2]), int(x.shape[3]))
        with self._lock:
            agrees = self._checked.get(shape)
            if agrees is None:
                agrees = self._checked[shape] = self._agrees(x[:1])
        if not agrees:
            with torch.no_grad():
                return self._pytorch[0](x).float()
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.detach().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"x": inputs})[0])

    def _agrees(self, x: torch.Tensor) -> bool:
        with torch.no_grad():
            expected = self._pytorch[0](x).float()
        found = self._run(x)
        scale = max(1.0, float(expected.abs().max()))
        if found.shape == expected.shape and float((found - expected).abs().max()) <= TOLERANCE * scale:
            return True
        log.warning("running the model in PyTorch for %dx%d inputs: ONNX Runtime's output differs from it",
                    *x.shape[2:])
        return False

    def __deepcopy__(self, memo: dict) -> OnnxForward:
        return self


TOLERANCE = 1e-3  # of the output's largest magnitude: float32 kernels differ by ~1e-6 of it


def fast_forward(model: nn.Module, example: torch.Tensor, dtype: torch.dtype | None = None,
                 threads: int | None = None) -> nn.Module:
    """The fastest way to run `model` forward on `example`'s device in float32: an
    `OnnxForward` on a CPU (on `threads` threads, default torch's count), else (a GPU, an
    autocast `dtype`, no onnxruntime, a model the exporter cannot take) `model` itself."""
    if example.device.type != "cpu" or dtype is not None:
        return model
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return model
    if refused := _refused(model):  # the exporter would print its whole graph to stdout, then fail
        log.info("running the model in PyTorch: %s", refused)
        return model
    try:
        return OnnxForward(model, example.cpu(), threads or torch.get_num_threads())
    except Exception as e:  # noqa: BLE001 - any exporter failure: PyTorch's own pass is as right, only slower
        log.warning("running the model in PyTorch: its ONNX export failed (%s: %s)", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return model


def _refused(model: nn.Module) -> str | None:
    """Why the exporter cannot take `model` with a dynamic height and width, where that is
    known beforehand: an adaptive pool to a grid other than 1x1 (AlexNet's 6x6, VGG's 7x7)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = module.output_size
            grid = (size, size) if isinstance(size, int) else tuple(size)
            if grid != (1, 1):
                shown = "x".join("input" if side is None else str(side) for side in grid)
                return f"{name} pools to a {shown} grid, which ONNX export takes at a fixed input size only"
    return None
