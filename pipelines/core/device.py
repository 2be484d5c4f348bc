"""Where and how precisely models run: device choice, autocast precision, inference copies.

`auto` picks CUDA when present; precision `auto` picks bf16 on CPUs with AVX512-BF16/AMX
(about 4x fp32 for ResNet-18 here) and on GPUs that support it, fp16 on older GPUs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from featscope.kernels.batchnorm_folding import fold_batchnorm
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerSpec
from featscope.pipelines.core.models import LoadedModel

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)
RENDER_PRECISION_HELP = ("the model's forward and backward passes while images are optimised: fp32, or bf16 "
                         "(1.3x faster on a 2-core AMD EPYC with AVX512-BF16; other images, reaching about as high)")


def slow_render_precision(precision: str, device: torch.device) -> str:
    """Why images optimised in `precision` on `device` will be slow, or "": bf16 on a CPU whose
    oneDNN lacks it (no AVX-512) runs on PyTorch's reference kernels, as fp16 does on one
    without AVX512-FP16 (MobileNet-V2 extraction on a 2-core AMD EPYC: 7 img/s against 45 in
    fp32)."""
    from featscope.kernels.conv_fusion import onednn_runs

    if precision == "bf16" and device.type == "cpu" and not onednn_runs(torch.bfloat16):
        return ("bf16 runs on PyTorch's slow reference kernels on this CPU (oneDNN's bf16 needs AVX-512): "
                "fp32 is likely faster here")
    return ""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeatscopeError("device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise FeatscopeError(f"device must be auto, cpu or cuda, got '{device}'")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16 instructions (where bf16 is ~2-4x fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", *PRECISIONS):
        raise FeatscopeError(f"precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision choice on a device (None: float32)."""
    return PRECISIONS[resolve_precision(precision, device)]


def inference_model(loaded: LoadedModel, specs: list[LayerSpec]) -> torch.nn.Module:
    """A copy of the model for forward passes only: batch norms folded into their convs
    wherever that leaves the tapped layers' outputs as they are (see
    `kernels.batchnorm_folding`)."""
    model = copy.deepcopy(loaded.module).eval()
    fold_batchnorm(model, keep=[spec.module_path for spec in specs if spec.kind != "pixels"])
    return model
