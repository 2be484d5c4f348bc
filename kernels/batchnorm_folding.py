"""Fold inference-mode batch norms into the convolutions before them.

In eval mode a BatchNorm2d is a fixed per-channel affine map, so conv -> BN equals one conv
with rescaled weights and a bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`). Folding
removes a full read and write of every conv output: MobileNet-V2 (bf16, 2 CPU cores) ran
1.3x faster, ResNet-18 and -50 5-7%, with fp32 outputs within 1e-6 of the unfolded model.

Which BN follows which conv comes from a torch.fx trace of the forward pass, not from module
names. Such a trace patches `nn.Module.__call__` for the whole process while it runs, so a
forward pass on another thread at that moment fails: code that runs forward passes on threads
beside model preparation holds `TRACING` around them. A pair is left alone when one of `keep`
(module paths that are tapped for their outputs) would see a different tensor after folding:
the conv itself, its BN, or a module that holds the conv but not its BN.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

TRACING = threading.RLock()
"""Held while a model is traced (the trace patches `nn.Module.__call__` process-wide)."""


def traced_graph(model: nn.Module) -> fx.Graph | None:
    """The dataflow of `model`'s forward pass, or None where torch.fx cannot trace it
    (data-dependent control flow): a pass that rewrites the model then changes nothing."""
    try:
        with TRACING:
            return fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any failure to trace means: leave the model as it is
        return None


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv path, BN path) for each BatchNorm2d whose only input is a Conv2d used nowhere
    else; [] when the model cannot be traced."""
    graph = traced_graph(model)
    if graph is None:
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules.get(source.target), nn.Conv2d)):
            pairs.append((source.target, node.target))
    return pairs


def _changes_tap(tap: str, conv: str, bn: str) -> bool:
    holds = lambda path: path.startswith(tap + ".")  # noqa: E731
    return tap in (conv, bn) or (tap != "" and holds(conv) and not holds(bn))


def fold_batchnorm(model: nn.Module, keep: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Fold each conv -> BN pair of an eval-mode `model` in place (the conv becomes the
    folded conv, the BN an Identity); returns the folded pairs."""
    if model.training:
        raise ValueError("batch norms can be folded only in eval mode")
    taps = list(keep)
    folded = []
    with torch.no_grad():
        for conv_path, bn_path in conv_bn_pairs(model):
            if any(_changes_tap(tap, conv_path, bn_path) for tap in taps):
                continue
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
            model.set_submodule(conv_path, fuse_conv_bn_eval(conv, bn))
            model.set_submodule(bn_path, nn.Identity())
            folded.append((conv_path, bn_path))
    return folded
