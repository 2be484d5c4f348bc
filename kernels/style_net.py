"""Fast feed-forward style transfer: an image transformation network with conditional
instance normalisation (Johnson et al., 2016; Dumoulin et al., 2017).

One network serves N styles: every normalisation layer holds a (gamma_s, beta_s) per
style, and the network takes, beside the image, style weights w (B, N): the layer uses
gamma = w @ gamma_all and beta = w @ beta_all. A one-hot w selects a style; a convex
combination mixes styles; `add_style` appends a new (gamma, beta) row that can be trained
alone (`StyleNet.freeze_for_new_style`) while the rest of the network stays fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalInstanceNorm2d(nn.Module):
    """Instance norm whose affine parameters are a style-weighted mix of per-style ones."""

    def __init__(self, channels: int, styles: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(styles, channels))
        self.beta = nn.Parameter(torch.zeros(styles, channels))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        normalised = F.instance_norm(x)
        gamma = (weights @ self.gamma)[:, :, None, None]
        beta = (weights @ self.beta)[:, :, None, None]
        return normalised * gamma + beta

    def add_style(self, init_from: int | None = None) -> None:
        """Append one style's row (a copy of style `init_from`, or the identity)."""
        gamma = self.gamma.data[init_from:init_from + 1] if init_from is not None else torch.ones_like(self.gamma[:1])
        beta = self.beta.data[init_from:init_from + 1] if init_from is not None else torch.zeros_like(self.beta[:1])
        self.gamma = nn.Parameter(torch.cat([self.gamma.data, gamma.clone()]))
        self.beta = nn.Parameter(torch.cat([self.beta.data, beta.clone()]))


class _ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, styles: int, stride: int = 1, upsample: bool = False,
                 relu: bool = True):
        super().__init__()
        self.upsample = upsample
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride)
        self.norm = ConditionalInstanceNorm2d(cout, styles)
        self.relu = relu

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm(self.conv(self.pad(x)), weights)
        return F.relu(x) if self.relu else x


class _Residual(nn.Module):
    def __init__(self, channels: int, styles: int):
        super().__init__()
        self.a = _ConvNorm(channels, channels, 3, styles)
        self.b = _ConvNorm(channels, channels, 3, styles, relu=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x, weights), weights)


class StyleNet(nn.Module):
    """Pixels in [0,1] (B,3,H,W) and style weights (B,N) -> stylised pixels in [0,1].

    width 32 and 5 residual blocks is Johnson et al.'s network; smaller widths train at
    small sizes on a CPU.
    """

    def __init__(self, styles: int, width: int = 32, blocks: int = 5):
        super().__init__()
        self.styles = styles
        self.width = width
        self.blocks = blocks
        w = width
        self.down = nn.ModuleList([_ConvNorm(3, w, 9, styles), _ConvNorm(w, 2 * w, 3, styles, stride=2),
                                   _ConvNorm(2 * w, 4 * w, 3, styles, stride=2)])
        self.residual = nn.ModuleList([_Residual(4 * w, styles) for _ in range(blocks)])
        self.up = nn.ModuleList([_ConvNorm(4 * w, 2 * w, 3, styles, upsample=True),
                                 _ConvNorm(2 * w, w, 3, styles, upsample=True)])
        self.out_pad = nn.ReflectionPad2d(4)
        self.out = nn.Conv2d(w, 3, 9)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        for layer in (*self.down, *self.residual, *self.up):
            x = layer(x, weights)
        return torch.sigmoid(self.out(self.out_pad(x)))

    def norms(self) -> list[ConditionalInstanceNorm2d]:
        return [m for m in self.modules() if isinstance(m, ConditionalInstanceNorm2d)]

    def add_style(self, init_from: int | None = None) -> int:
        """Add a style to every normalisation layer; returns its index."""
        for norm in self.norms():
            norm.add_style(init_from)
        self.styles += 1
        return self.styles - 1

    def freeze_for_new_style(self, style: int) -> None:
        """Train only style `style`'s gamma/beta: other parameters get no gradient, and the
        other styles' rows of gamma/beta have their gradients zeroed by hooks."""
        for p in self.parameters():
            p.requires_grad_(False)
        keep = torch.zeros(self.styles, 1)
        keep[style] = 1.0
        for norm in self.norms():
            for p in (norm.gamma, norm.beta):
                p.requires_grad_(True)
                p.register_hook(lambda g, keep=keep: g * keep.to(g.device))


def one_hot(style: int, styles: int, batch: int = 1) -> torch.Tensor:
    weights = torch.zeros(batch, styles)
    weights[:, style] = 1.0
    return weights


def mix(weights: list[float], batch: int = 1) -> torch.Tensor:
    """Convex style weights (normalised to sum 1), repeated for a batch."""
    w = torch.tensor(weights, dtype=torch.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"style mix weights must be >= 0 and not all 0, got {weights}")
    return (w / w.sum()).expand(batch, -1).clone()
