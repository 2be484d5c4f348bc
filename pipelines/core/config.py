"""Workflow config: YAML checked against config/schema.yaml before any job runs.

Errors name the offending key (`model.arch`, `extract.batch_size`) and what was expected;
layer names are checked against the chosen architecture too, so a typo fails in the first
second rather than in the first extraction job.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import torch
import torchvision
import yaml

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import resolve_layer

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def _with_defaults(config: dict, schema: dict) -> dict:
    """Fill `default`s of the schema's object properties (jsonschema only checks, never fills)."""
    out = copy.deepcopy(config)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object":
            # A missing section is filled with its defaults, unless it has required keys: such a
            # section (a toolbox part, style_net) is off when absent.
            if key not in out and sub.get("properties") and not sub.get("required"):
                out[key] = {}
            if isinstance(out.get(key), dict):
                out[key] = _with_defaults(out[key], sub)
    return out


def validate(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Return `config` with defaults filled in, or raise FeatscopeError naming the bad key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    if not isinstance(config, dict):
        raise FeatscopeError("config error: the config must be a mapping of keys to values")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise FeatscopeError(f"config error at {where}: {err.message}")
    config = _with_defaults(config, schema)
    arch = config["model"]["arch"]
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise FeatscopeError(f"config error at model.arch: unknown architecture '{arch}'")
    with torch.device("meta"):  # structure only: no weights allocated, no download
        skeleton = torchvision.models.get_model(arch, weights=None)
    if "pixels" in config["layers"]:
        raise FeatscopeError("config error at layers: 'pixels' is added by index.pixels, not listed as a layer")
    for i, layer in enumerate(config["layers"]):
        try:
            resolve_layer(arch, skeleton, layer)
        except FeatscopeError as e:
            raise FeatscopeError(f"config error at layers.{i}: {e}") from None
    viz = config.get("viz", {})
    named = [("viz.filters", viz.get("filters", []))]
    named += [(f"viz.{part}.layers", viz[part]["layers"]) for part in ("activations", "dream", "inversion", "texture")
              if part in viz]
    if "style_transfer" in viz:
        named += [("viz.style_transfer.style_layers", [viz["style_transfer"]["content_layer"],
                                                        *viz["style_transfer"]["style_layers"]])]
    for where, layers in named:
        for i, layer in enumerate(layers):
            try:
                resolve_layer(arch, skeleton, layer)
            except FeatscopeError as e:
                raise FeatscopeError(f"config error at {where}.{i}: {e}") from None
    for section in ("topk", "embed"):
        for i, layer in enumerate(config[section].get("layers", [])):
            if layer not in config["layers"]:
                raise FeatscopeError(f"config error at {section}.layers.{i}: '{layer}' is not one of the extracted layers")
    return config


def load(path: str | Path, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Read and validate a YAML config file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FeatscopeError(f"cannot read config {path}: {e}") from None
    return validate(raw, schema_path)
