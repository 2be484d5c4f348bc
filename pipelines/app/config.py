"""Workflow config: YAML checked against config/schema.yaml before any job runs.

The schema ships inside the package (`featscope.config`). Its stage sections name a
featscope command (`x-options: saliency`) and take that command's options as keys, with
the same names, types, defaults, choices and bounds: they are filled in here from the
options dataclasses, so an option is declared once. `options_for` turns a section back
into the command's options, which is how the Snakefile builds its command lines.

Errors name the offending key (`model.arch`, `extract.batch_size`) and what was expected;
layer names are checked against the chosen architecture too, so a typo fails in the first
second rather than in the first extraction job.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import options as opts


def _option_schema(spec: opts.Spec) -> dict:
    kind = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "string"}[spec.type]
    item: dict = {"type": list(spec.json_type) if spec.json_type else kind}
    if spec.param.choices:
        item = {"enum": list(spec.param.choices)}
    if spec.param.min is not None:
        item["minimum"] = spec.param.min
    if spec.param.max is not None:
        item["maximum"] = spec.param.max
    if spec.param.pattern:
        item["pattern"] = spec.param.pattern
    out = {"type": "array", "items": item} if spec.is_list else dict(item)
    if spec.optional and not spec.required:
        out = {"anyOf": [out, {"type": "null"}]}
    if spec.default is not None and not spec.required:
        out["default"] = [str(v) if isinstance(v, Path) else v for v in spec.default] if spec.is_list \
            else str(spec.default) if isinstance(spec.default, Path) else spec.default
    out["description"] = spec.help
    return out


def _expand(node: object, commands: dict[str, opts.Command]) -> object:
    """The schema with every `x-options` section's properties filled from the command."""
    if isinstance(node, list):
        return [_expand(v, commands) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _expand(v, commands) for k, v in node.items()}
    if "x-choices-of" in node:
        name, _, field = node.pop("x-choices-of").partition(".")
        spec = next(s for s in opts.specs(commands[name].options) if s.name == field)
        node["enum"] = list(spec.param.choices)
    if "x-options" in node:
        command = commands[node["x-options"]]
        fixed = set(node.get("x-fixed", []))
        own = node.setdefault("properties", {})
        required = list(node.get("required", []))
        for spec in opts.specs(command.options):
            if spec.name in fixed:
                continue
            if spec.name in own:
                raise ValueError(f"schema: '{spec.name}' is both an option of `{command.name}` and a workflow key")
            own[spec.name] = _option_schema(spec)
            if spec.required:
                required.append(spec.name)
        node["additionalProperties"] = False
        if required:
            node["required"] = required
    return node


def schema() -> dict:
    """The full config schema: schema.yaml with the commands' options filled in."""
    from featscope.pipelines.app.cli import commands

    text = resources.files("featscope.config").joinpath("schema.yaml").read_text()
    return _expand(yaml.safe_load(text), commands())


def _with_defaults(config: dict, schema: dict) -> dict:
    """Fill `default`s of the schema's object properties (jsonschema only checks, never fills).
    A section given as null is taken as left out."""
    out = {k: v for k, v in copy.deepcopy(config).items() if v is not None}
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        kinds = sub.get("type") if isinstance(sub.get("type"), list) else [sub.get("type")]
        if "object" in kinds:
            # A missing section is filled with its defaults, unless it has required keys: such a
            # section (a toolbox part, style_net) is off when absent.
            if key not in out and sub.get("properties") and not sub.get("required"):
                out[key] = {}
            if isinstance(out.get(key), dict):
                out[key] = _with_defaults(out[key], sub)
    return out


def _numbers(value: object, where: str = "") -> Iterator[tuple[str, float]]:
    """Every float in a parsed config, with its dotted key."""
    if isinstance(value, float):
        yield where or "(top level)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{where}.{i}")


def validate(config: dict, full_schema: dict | None = None) -> dict:
    """Return `config` with defaults filled in, or raise FeatscopeError naming the bad key."""
    import torch
    import torchvision

    from featscope.kernels.layers import resolve_layer

    full_schema = full_schema or schema()
    if not isinstance(config, dict):
        raise FeatscopeError("config error: the config must be a mapping of keys to values")
    errors = sorted(jsonschema.Draft202012Validator(full_schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if list(err.absolute_path) == ["run"] and err.validator == "pattern":  # the regular expression says less
            raise FeatscopeError(f"config error at run: must be a folder name (letters, digits, '.', '_', '-'; "
                                 f"not . or ..), not {err.instance!r}")
        raise FeatscopeError(f"config error at {where}: {err.message}")
    for where, value in _numbers(config):  # JSON Schema lets NaN pass every bound (.nan in YAML)
        if not math.isfinite(value):
            raise FeatscopeError(f"config error at {where}: must be a finite number, got {value}")
    config = _with_defaults(config, full_schema)
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
    units = config.get("units") or {}
    named += [(f"units.{part}.layers", (units.get(part) or {}).get("layers", [])) for part in ("render", "atlas")]
    for where, layers in named:
        for i, layer in enumerate(layers):
            try:
                resolve_layer(arch, skeleton, layer)
            except FeatscopeError as e:
                raise FeatscopeError(f"config error at {where}.{i}: {e}") from None
    extracted = [("topk", config["topk"]), ("embed", config["embed"]), ("units.label", units.get("label") or {})]
    for section, part in extracted:
        for i, layer in enumerate(part.get("layers", [])):
            if layer not in config["layers"]:
                raise FeatscopeError(f"config error at {section}.layers.{i}: '{layer}' is not one of the extracted "
                                     "layers")
    return config


def check_against_run(config: dict, run_json: Path) -> None:
    """Refuse, naming the key, an extraction setting that the run's record (run.json) already
    rules out: another precision than its features', another seed for its random weights.
    Its extract jobs would refuse it too, but only after Snakemake had deleted the feature
    parts they were to make again: checked when the workflow starts, nothing is lost."""
    try:
        recorded = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return  # a new run, or a damaged record that the jobs name
    precision, held = config["extract"].get("precision", "auto"), recorded.get("precision")
    if precision != "auto" and held and precision != held:
        raise FeatscopeError(f"config error at extract.precision: run {run_json.parent} holds {held} features, and "
                             f"{precision} ones would differ from them by a few percent; give {held} (or auto), or "
                             "use another run directory")
    seed = config["model"].get("seed", 0)
    if recorded.get("weights") == "random" and recorded.get("weights_sha256") and recorded.get("seed", 0) != seed:
        raise FeatscopeError(f"config error at model.seed: run {run_json.parent} holds features of random weights "
                             f"drawn with seed {recorded.get('seed', 0)}, not {seed}; give {recorded.get('seed', 0)}, "
                             "or use another run directory")


class _OneValuePerKey(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error. YAML (and
    so Snakemake) keeps the last value silently: a second `extract:` section further down a
    long config, or `layers:` written twice, replaced the first unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"'{key}' is given twice in one mapping (first at line {first_line[key] + 1}): "
                                    "YAML would keep only the last", key_node.start_mark)
                first_line[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the loader's own error follows
                pass
        return super().construct_mapping(node, deep)


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise FeatscopeError(f"'{key}' is given twice in one object: JSON readers keep only the last")
        found[key] = value
    return found


def _parse(text: str) -> object:
    """JSON if it is JSON (as Snakemake reads a config file first), else YAML; a key given
    twice is an error in either."""
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError:
        return yaml.load(text, Loader=_OneValuePerKey)


def read(path: str | Path) -> object:
    """A YAML (or JSON) config file as Python objects, without validating it: a file that is
    neither, or gives a key twice, is a one-line error naming the place."""
    try:
        return _parse(Path(path).read_text())
    except FeatscopeError as e:
        raise FeatscopeError(f"cannot read config {path}: {e}") from None
    except yaml.MarkedYAMLError as e:  # the place and the problem on one line, not YAML's caret drawing
        at = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        context = f" ({e.context} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise FeatscopeError(f"cannot read config {path}: {at}{e.problem}{context}") from None
    except OSError as e:
        raise FeatscopeError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FeatscopeError(f"cannot read config {path}: not UTF-8 text (a YAML file is)") from None
    except yaml.YAMLError as e:
        raise FeatscopeError(f"cannot read config {path}: {e}") from None


def load(path: str | Path) -> dict:
    """Read and validate a YAML config file."""
    return validate(read(path))


def options_for(section: dict, command: opts.Command, **fixed: object) -> opts.Options:
    """The options of `command` from a validated config section and the values the workflow
    fixes itself (layer, method, ...); keys of the section that are no option are skipped."""
    names = {s.name for s in opts.specs(command.options)}
    values = {k: v for k, v in section.items() if k in names} | fixed
    return opts.build(command.options, values)
