"""`featscope config schema`: the workflow config's whole schema, options filled in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from featscope.pipelines.core.options import Command, Options, option


@dataclass(frozen=True)
class SchemaOptions(Options):
    check: Path | None = option(help="instead, validate this config file and print it with its defaults")


def _schema(options: SchemaOptions) -> str:
    from featscope.pipelines.app import config

    if options.check is not None:
        return yaml.safe_dump(config.load(options.check), sort_keys=False).rstrip()
    return yaml.safe_dump(config.schema(), sort_keys=False, width=110).rstrip()


COMMANDS = [
    Command("config schema", SchemaOptions, _schema, needs_run=False,
            help="print the workflow config's schema (every key, type and default), or check a config"),
]
