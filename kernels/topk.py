"""Running top-k per channel: the k images that activate each unit most, in one pass.

State is (C, k) per field, independent of the number of images, and stays on the device
the model runs on. Ties are broken by the smaller image_id, so results do not depend on
batch order or size.
"""

from __future__ import annotations

import torch

_NO_IMAGE = torch.iinfo(torch.int64).max


def _select(values: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (C, k) of the k largest values per row, ties to the smaller id."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    by_value = torch.argsort(-values.gather(1, by_id), dim=1, stable=True)[:, :k]
    return by_id.gather(1, by_value)


class RunningTopK:
    """Top-k (value, image_id, cell) per channel over batches of per-image maxima."""

    def __init__(self, channels: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.full((channels, k), -torch.inf, device=device)
        self.ids = torch.full((channels, k), _NO_IMAGE, dtype=torch.int64, device=device)
        self.fy = torch.zeros((channels, k), dtype=torch.int16, device=device)
        self.fx = torch.zeros((channels, k), dtype=torch.int16, device=device)

    def update(self, values: torch.Tensor, image_ids: torch.Tensor, fy: torch.Tensor | None = None,
               fx: torch.Tensor | None = None) -> None:
        """values (B,C) float; image_ids (B,); fy, fx (B,C) cells of the maxima (None: 0)."""
        b, c = values.shape
        ids = image_ids.to(self.ids.device).view(1, b).expand(c, b)
        zeros = torch.zeros((c, b), dtype=torch.int16, device=self.ids.device)
        cand_v = torch.cat([self.values, values.float().T], dim=1)
        cand_i = torch.cat([self.ids, ids], dim=1)
        cand_y = torch.cat([self.fy, zeros if fy is None else fy.T.to(torch.int16)], dim=1)
        cand_x = torch.cat([self.fx, zeros if fx is None else fx.T.to(torch.int16)], dim=1)
        keep = _select(cand_v, cand_i, self.k)
        self.values, self.ids = cand_v.gather(1, keep), cand_i.gather(1, keep)
        self.fy, self.fx = cand_y.gather(1, keep), cand_x.gather(1, keep)

    def result(self) -> dict[str, torch.Tensor]:
        """Flat (channel, rank, value, image_id, fy, fx) of the filled slots, on the CPU."""
        channels, k = self.values.shape
        filled = self.ids != _NO_IMAGE
        channel = torch.arange(channels).view(-1, 1).expand(channels, k)
        rank = torch.arange(k).view(1, -1).expand(channels, k)
        cpu = {name: t.cpu() for name, t in
               (("value", self.values), ("image_id", self.ids), ("fy", self.fy), ("fx", self.fx))}
        mask = filled.cpu()
        return {"channel": channel[mask], "rank": rank[mask], **{n: t[mask] for n, t in cpu.items()}}


def merge_topk(channel: torch.Tensor, value: torch.Tensor, image_id: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the global top-k rows per channel among candidate rows (from many shards),
    ordered by channel, then rank; the same tie rule as `RunningTopK`."""
    order = torch.argsort(image_id, stable=True)
    order = order[torch.argsort(-value[order], stable=True)]
    order = order[torch.argsort(channel[order], stable=True)]
    sorted_channels = channel[order]
    first = torch.searchsorted(sorted_channels, sorted_channels, right=False)
    rank = torch.arange(len(order)) - first
    return order[rank < k]
