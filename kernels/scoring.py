"""The class score a saliency map explains, and inputs laid out as the model expects."""

from __future__ import annotations

import torch
from torch import nn

from featscope.kernels.errors import FeatscopeError

SCORES = ("logit", "probability")


def class_score(logits: torch.Tensor, target: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """(B,K) logits, (B,) class ids -> (B,) the target's logit or softmax probability."""
    if score not in SCORES:
        raise FeatscopeError(f"score must be one of {', '.join(SCORES)}, not '{score}'")
    logits = logits.float()
    values = logits.softmax(dim=1) if score == "probability" else logits
    return values.gather(1, target.view(-1, 1).to(values.device)).squeeze(1)


def like_model(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """`x` in the memory format of the model's first conv weight (channels_last or not)."""
    weight = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x
