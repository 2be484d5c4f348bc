"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency
Maps"): re-initialise a model's layers from the top down, one group more at each step, so a
saliency method can be recomputed on each step's model. A map that barely changes while the
weights it should explain are destroyed reflects the image, not the model.

Re-initialisation is each module's own `reset_parameters()` (PyTorch's default init; batch
norms become identities in eval mode), drawn from `seed + 1` per module as Quantus's
`get_random_layer_generator` does, so the two give the same randomised models.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

GRANULARITIES = ("block", "module")


def resettable(model: nn.Module) -> list[str]:
    """Paths of the modules with parameters of their own to re-initialise, in forward order."""
    return [name for name, module in model.named_modules() if name and hasattr(module, "reset_parameters")]


def layer_groups(model: nn.Module, granularity: str = "block") -> list[tuple[str, list[str]]]:
    """The randomisation steps, top (output) first: (name, module paths) each.

    module: every resettable module is a step (Quantus's order). block: modules are grouped
    by the first two parts of their path (`features.14`, `layer4.1`, `classifier.1`), which
    is a block of torchvision's families; a step per block keeps the curve readable.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not '{granularity}'")
    paths = resettable(model)
    if granularity == "module":
        return [(p, [p]) for p in reversed(paths)]
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(".".join(path.split(".")[:2]), []).append(path)
    return [(name, members[::-1]) for name, members in reversed(list(groups.items()))]


def merge_groups(groups: list[tuple[str, list[str]]], at_most: int) -> list[tuple[str, list[str]]]:
    """At most `at_most` steps (0: as they are): adjacent groups merged into runs of near-equal
    length, top first; a merged step is named "<first> – <last>"."""
    if at_most <= 0 or len(groups) <= at_most:
        return groups
    bounds = [round(k * len(groups) / at_most) for k in range(at_most + 1)]
    merged = []
    for start, stop in zip(bounds, bounds[1:]):
        run = groups[start:stop]
        name = run[0][0] if len(run) == 1 else f"{run[0][0]} – {run[-1][0]}"
        merged.append((name, [path for _, paths in run for path in paths]))
    return merged


def cascading_randomisation(model: nn.Module, groups: list[tuple[str, list[str]]], *,
                            seed: int = 42) -> Iterator[tuple[str, nn.Module]]:
    """Yield (group name, model) after each group is re-initialised, cumulatively, on one copy
    of `model` (the original is never touched; the global random state is left as it was)."""
    randomised = copy.deepcopy(model).eval()
    for name, paths in groups:
        for path in paths:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                randomised.get_submodule(path).reset_parameters()
        yield name, randomised
