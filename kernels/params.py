"""How a tunable parameter describes itself: help text, choices and bounds, in one place.

Stage options (dataclass fields) and kernel parameters (`Annotated[int, Param(...)]`) use
the same description, from which the command line, the config schema and the checks are
derived. Nothing here knows about flags or files: a parameter has a name and a meaning.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass

from featscope.kernels.errors import FeatscopeError


@dataclass(frozen=True)
class Param:
    """What a parameter means and which values it takes."""

    help: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    pattern: str | None = None  # a regular expression every text value must match
    validate: Callable[[str, object], None] | None = None  # raises ParamError for a bad value

    def check(self, name: str, value: object) -> None:
        """Raise a one-line error naming the parameter when `value` is out of range."""
        if value is None or isinstance(value, bool):
            return
        if self.validate is not None:
            self.validate(name, value)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if self.choices and v not in self.choices:
                raise ParamError(name, f"must be one of {', '.join(map(str, self.choices))}, not {v!r}")
            if self.pattern and isinstance(v, str) and not re.search(self.pattern, v):
                raise ParamError(name, f"must match {self.pattern}, not {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ParamError(name, f"must be a finite number, got {v}")
            if isinstance(v, (int, float)):
                if self.min is not None and v < self.min:
                    raise ParamError(name, f"must be at least {_number(self.min)}, got {v}")
                if self.max is not None and v > self.max:
                    raise ParamError(name, f"must be at most {_number(self.max)}, got {v}")


def _number(x: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09; 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class ParamError(FeatscopeError):
    """A parameter out of range; `param` names it, so the CLI can say which flag. Other
    parameters the problem mentions are written `<name>`: `said_as` renders every name."""

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(self.said_as(str))

    def said_as(self, name: Callable[[str], str]) -> str:
        """The message with each parameter called name(param), e.g. a flag. It starts with the
        parameter unless the problem names it itself (`<param>`)."""
        text = re.sub(r"<([a-z_0-9]+)>", lambda m: name(m.group(1)), self.problem)
        return text if f"<{self.param}>" in self.problem else f"{name(self.param)} {text}"


@dataclass(frozen=True)
class Declared:
    """A parameter of a function: its name, type, default and description."""

    name: str
    type: object
    default: object
    param: Param


def declared_params(function: Callable) -> list[Declared]:
    """The keyword parameters of `function` annotated `Annotated[T, Param(...)]`, in order."""
    hints = typing.get_type_hints(function, include_extras=True)
    found = []
    for name, parameter in inspect.signature(function).parameters.items():
        hint = hints.get(name)
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
            param = next((e for e in extras if isinstance(e, Param)), None)
            if param is not None:
                found.append(Declared(name, base, parameter.default, param))
    return found
