"""Adversarial examples within an L-infinity budget, in 8-bit pixel units.

FGSM (Goodfellow et al., 2015) takes one step of epsilon along the sign of the gradient of
the loss; PGD (Madry et al., 2018) iterates smaller signed steps, projecting back into the
epsilon-ball and the valid range after each. Targeted attacks descend the cross-entropy of
the target class, untargeted ones ascend that of the true (or predicted) class.

Every step is a whole number of grey levels and every bound lies on the 8-bit grid, so an
image that starts as 8-bit pixels stays on that grid: what is saved as an 8-bit PNG is
exactly what was classified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featscope.kernels.errors import FeatscopeError

LEVELS = 255.0


def _loss_gradient(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, classes, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def pgd(model: nn.Module, images: torch.Tensor, *, epsilon: int, target: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, steps: int = 20, step: int = 1,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B,3,H,W) in [0,1] on the 8-bit grid; epsilon and step in grey levels (0-255).

    Targeted when `target` (B,) is given, else untargeted away from `labels` (B,).
    Returns the adversarial images and the probability of target (or of the label) per
    step, (steps+1, B). With steps=1 and step=epsilon this is FGSM.
    """
    if (target is None) == (labels is None):
        raise FeatscopeError("give either target classes (targeted) or labels (untargeted)")
    if epsilon < 1 or step < 1 or steps < 1:
        raise FeatscopeError(f"epsilon, step and steps must be at least 1, got {epsilon}, {step}, {steps}")
    classes = target if target is not None else labels
    sign = -1.0 if target is not None else 1.0  # targeted: descend the target's loss
    low = (images - epsilon / LEVELS).clamp(0, 1)
    high = (images + epsilon / LEVELS).clamp(0, 1)
    x = images.clone()
    history = []
    for _ in range(steps):
        grad, logits = _loss_gradient(model, x, classes)
        history.append(logits.softmax(1).gather(1, classes.view(-1, 1))[:, 0])
        x = x + sign * (step / LEVELS) * grad.sign()
        x = torch.round(torch.minimum(torch.maximum(x, low), high) * LEVELS) / LEVELS
    with torch.no_grad():
        history.append(model(x).softmax(1).gather(1, classes.view(-1, 1))[:, 0])
    return x, torch.stack(history)


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epsilon: int) -> torch.Tensor:
    """One step of epsilon grey levels along the sign of the loss gradient (untargeted)."""
    return pgd(model, images, epsilon=epsilon, labels=labels, steps=1, step=epsilon)[0]
