"""How an optimised image is parameterised (Olah et al. 2017, "Feature Visualization"; the
parameterisation of Lucid and Lucent, with the same constants).

The image is the inverse real FFT of a spectrum whose coefficients are scaled by 1/frequency
(so gradient steps move all frequencies alike instead of favouring high-frequency noise), its
three channels mixed by the square root of ImageNet's colour correlation (so channels are
decorrelated), then squashed into [0, 1] by a sigmoid. A batch of images is one tensor of
spectra: many units are optimised together, one image each.
"""

from __future__ import annotations

import torch

# The square root of ImageNet's colour correlation matrix (Lucid's `color_correlation_svd_sqrt`).
COLOUR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                        [0.27, 0.00, -0.05],
                                        [0.27, -0.09, 0.03]])
COLOUR_MIX = COLOUR_CORRELATION_SQRT / COLOUR_CORRELATION_SQRT.norm(dim=0).max()
SPECTRUM_DIVISOR = 4.0  # Lucid's constant: larger values reduce saturation


def frequencies(height: int, width: int) -> torch.Tensor:
    """(H, W//2+1) the radial frequency of each coefficient of a real 2-D FFT."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class FourierImage(torch.nn.Module):
    """`batch` images of `size` x `size`, parameterised by scaled spectra in a decorrelated
    colour space; calling it gives the images (B,3,H,W) in [0, 1]."""

    def __init__(self, batch: int, size: int, *, sd: float = 0.01, decay: float = 1.0,
                 generator: torch.Generator | None = None, seeds: list[int] | None = None):
        """`seeds`: one per image, so an image starts the same whatever else is in its batch
        (else all are drawn from `generator`)."""
        super().__init__()
        self.size = size
        freqs = frequencies(size, size)
        shape = (3, *freqs.shape, 2)
        if seeds is not None:
            spectrum = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]) * sd
        else:
            spectrum = torch.randn((batch, *shape), generator=generator) * sd
        self.spectrum = torch.nn.Parameter(spectrum)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / size) ** decay
        self.register_buffer("scale", scale[None, None, ..., None], persistent=False)

    def forward(self) -> torch.Tensor:
        coefficients = torch.view_as_complex((self.scale * self.spectrum).contiguous())
        image = torch.fft.irfftn(coefficients, s=(self.size, self.size), norm="ortho") / SPECTRUM_DIVISOR
        # a (3,3) x (3, H*W) product per image: einsum took it as one matrix of B*H*W rows,
        # 7x slower (forward and backward, 4 images of 128 px on one thread), the same numbers
        mixed = (COLOUR_MIX.to(image.device) @ image.flatten(2)).view_as(image)
        return torch.sigmoid(mixed)

