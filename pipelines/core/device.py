"""Where and how precisely models run: device choice, autocast precision, inference copies.

`auto` picks CUDA when present; precision `auto` picks bf16 on CPUs with AVX512-BF16/AMX
(about 4x fp32 for ResNet-18 here) and on GPUs that support it, fp16 on older GPUs (fp32 for
the stages that optimise images).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from featscope.kernels.batchnorm_folding import fold_batchnorm
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerSpec
from featscope.pipelines.core.models import LoadedModel

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)
ONEDNN_NEEDS = {"bf16": "AVX-512", "fp16": "AVX512-FP16 or AVX-NE-CONVERT"}  # what its kernels of a dtype need


def render_precision_option():
    """The `precision` option of the stages that optimise images (units render, units atlas)."""
    from featscope.pipelines.core.options import option

    return option("auto", choices=("auto", "fp32", "bf16"), help=(
        "the model's forward and backward passes while images are optimised: auto (bf16 where it runs fast: a GPU "
        "with bf16, a CPU with AVX512-BF16 or AMX; else fp32), fp32 or bf16 (1.4-1.6x faster than fp32 on a 2-core "
        "AMD EPYC with AVX512-BF16; other images, reaching about as high)"))


def render_precision(precision: str, device: torch.device) -> str:
    """The precision images are optimised in: `auto` is bf16 where it runs fast, else fp32.
    Unlike extraction's `auto`, never fp16: gradient ascent in fp16 would need loss scaling."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() and not slow_on_this_cpu("bf16", device) else "fp32"


def render_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype images are optimised in (`render_precision`; None: float32)."""
    return PRECISIONS[render_precision(precision, device)]


def slow_on_this_cpu(precision: str, device: torch.device) -> str:
    """Why `precision` runs slowly on `device`, or "": a reduced precision that this CPU's oneDNN
    lacks runs on PyTorch's reference kernels (fp16 on a 2-core AMD EPYC without AVX512-FP16:
    MobileNet-V2 extraction at 7 img/s against 45 in fp32)."""
    from featscope.kernels.conv_fusion import onednn_runs

    dtype = PRECISIONS.get(precision)
    if dtype is None or device.type != "cpu" or onednn_runs(dtype):
        return ""
    return f"{precision} runs on PyTorch's slow reference kernels on this CPU (oneDNN's {precision} needs " \
           f"{ONEDNN_NEEDS[precision]})"


def slow_render_precision(precision: str, device: torch.device) -> str:
    """`slow_on_this_cpu` for the stages that optimise images, with what to do instead, or ""."""
    slow = slow_on_this_cpu(precision, device)
    return f"{slow}: fp32 is likely faster here" if slow else ""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeatscopeError("device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise FeatscopeError(f"device must be auto, cpu or cuda, got '{device}'")
    return torch.device(device)


@functools.cache
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
