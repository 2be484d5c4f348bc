"""Stage options declared once: a frozen dataclass per command, each field an `option(...)`.

A field's type, default, help, choices and bounds are written only here, beside the stage's
`run`; the command line (`app.cli`), the config schema's sections (`core.config`) and the
Snakefile's command lines are derived from them. Options check themselves when built, so
an options object that exists is valid.

    @dataclass(frozen=True)
    class EmbedOptions(Options):
        layer: str = option(help="an extracted layer", required=True)
        pca_dims: int = option(50, help="PCA dimensions before t-SNE", min=2)

Types: str, int, float, bool, Path, list[str] / list[int] / list[float], each possibly
`| None` (None: "not given", the stage decides).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import Param, ParamError

SCALARS = (str, int, float, bool, Path)


def option(default: object = MISSING, *, help: str = "", choices: tuple | list = (), min: float | None = None,
           max: float | None = None, pattern: str | None = None, required: bool = False, positional: bool = False,
           spaced: bool = False, param: Param | None = None,
           json_type: tuple[str, ...] = (), tuning: bool = False) -> dataclasses.Field:
    """A declared option. `required`: no default, must be given. `positional`: given without
    a name on the command line. `spaced`: a list given as separate words, not comma-joined.
    `param`: a whole description instead (a kernel parameter's). `json_type`: the JSON types a
    config file may use for it (or each item), where they are wider than the field's type.
    `tuning`: how the command runs (threads, workers, batch size, device), not what it makes:
    the workflow redoes nothing when only such an option changes (`deciding`)."""
    meta = {"param": param or Param(help, tuple(choices), min, max, pattern), "required": required,
            "positional": positional, "spaced": spaced, "json_type": json_type, "tuning": tuning}
    if required:
        default = None
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=None if default is MISSING else default, metadata=meta)


def seed_option(default: int = 0, *, help: str) -> dataclasses.Field:
    """A random seed: 0 to 2**32 - 1, what numpy, torch and faiss all take (numpy refuses a
    negative seed with a traceback, deep in a stage)."""
    return option(default, help=help, min=0, max=2**32 - 1)


@dataclass(frozen=True)
class Spec:
    """One declared option, resolved: its name, scalar type, list-ness and description."""

    name: str
    type: type  # the scalar type (the item type for lists)
    is_list: bool
    optional: bool  # may be None
    default: object
    param: Param
    required: bool
    positional: bool
    spaced: bool
    json_type: tuple[str, ...] = ()
    tuning: bool = False  # see `option`

    @property
    def help(self) -> str:
        return self.param.help

    def convert(self, value: object) -> object:
        """A value from YAML or the command line -> this option's type (one-line error if it fits not)."""
        if value is None:
            return None
        try:
            if self.is_list:
                items = value.split(",") if isinstance(value, str) else list(value)
                values = [self._scalar(v.strip() if isinstance(v, str) else v) for v in items
                          if not (isinstance(v, str) and not v.strip())]
            else:
                return self._scalar(value)
        except (TypeError, ValueError):
            raise ParamError(self.name, f"must be {self.type_name}, got {value!r}") from None
        if self.required and not values:  # `--classes ""`: nothing to work on is a typo, not a request
            raise ParamError(self.name, f"needs at least one value, got {value!r}")
        return values

    def _scalar(self, value: object) -> object:
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError(value)
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if self.type is int and isinstance(value, bool):
            raise ValueError(value)
        return self.type(value)

    @property
    def type_name(self) -> str:
        name = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                Path: "a path"}[self.type]
        return f"a list of {name.split(' ', 1)[1]}s" if self.is_list else name


def _resolve(hint: object) -> tuple[type, bool, bool]:
    """(scalar type, is list, optional) of a field's type hint."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return item, True, optional
    if hint not in SCALARS:
        raise TypeError(f"unsupported option type {hint!r}")
    return hint, False, optional


def spec_of(name: str, hint: object, default: object, param: Param, *, required: bool = False,
            positional: bool = False, spaced: bool = False, json_type: tuple[str, ...] = (),
            tuning: bool = False) -> Spec:
    scalar, is_list, optional = _resolve(hint)
    return Spec(name, scalar, is_list, optional or default is None, default, param, required, positional, spaced,
                json_type, tuning)


def specs(cls: type) -> list[Spec]:
    """The declared options of an options dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "param" not in f.metadata:
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                               else None)
        out.append(spec_of(f.name, hints[f.name], default, f.metadata["param"], required=f.metadata["required"],
                           positional=f.metadata["positional"], spaced=f.metadata["spaced"],
                           json_type=f.metadata.get("json_type", ()), tuning=f.metadata.get("tuning", False)))
    return out


def deciding(options: Options) -> dict[str, object]:
    """{name: value} of `options` but the tuning ones, for those that differ from their
    defaults (as a command line writes them): what decides the command's outputs. Two option
    sets that make the same outputs give equal dicts, and an option added to the command
    later, at a default that keeps what it made, changes none."""
    return {s.name: value for s in specs(type(options))
            if not s.tuning and (value := getattr(options, s.name)) != s.default}


class Options:
    """Base of every options dataclass: values are converted and checked when built."""

    def __post_init__(self) -> None:
        for spec in specs(type(self)):
            value = spec.convert(getattr(self, spec.name))
            if value is None and spec.required:
                raise ParamError(spec.name, "is required")
            spec.param.check(spec.name, value)
            object.__setattr__(self, spec.name, value)


def build(cls: type, values: Mapping[str, object]) -> Options:
    """An options object from a mapping of names to values (a config section, parsed flags);
    unknown names are a one-line error."""
    names = {s.name for s in specs(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise FeatscopeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(names))})")
    return cls(**values)


@dataclass(frozen=True)
class Group:
    """Options of a command of which at most one (exactly one if `required`) may be given."""

    names: tuple[str, ...]
    required: bool = False


@dataclass(frozen=True)
class Command:
    """A command of the `featscope` tool: its words, options, what it calls, and its help.

    `run(rd, options, progress)` when `needs_run`, else `run(options, progress)`; it returns
    a summary (anything with `line()`), a string, or None; a summary's optional `warning()`
    goes to stderr."""

    name: str  # e.g. "index build"
    options: type
    run: Callable
    help: str
    description: str = ""
    needs_run: bool = True
    groups: tuple[Group, ...] = ()
    records_timing: bool = True  # the CLI records how long a writing command took


def parse_units(text: str | None) -> list[int] | None:
    """'0-63' / '3,7,10-12' -> unit numbers, each once, in the order given; None -> all.
    A range that runs backwards ('5-2') is an error, not an empty list, which callers would
    read as "all units"."""
    if not text:
        return None
    units = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise FeatscopeError(f"cannot read units '{text}': use e.g. 0-63 or 3,7,10-12") from None
        if last < first:
            raise FeatscopeError(f"cannot read units '{text}': the range {part.strip()} runs backwards "
                                 f"(write {last}-{first})")
        units += range(first, last + 1)
    return list(dict.fromkeys(units))
