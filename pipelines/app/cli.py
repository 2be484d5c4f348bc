"""The `featscope` command: one subcommand per stage command, derived from its options.

Each command is declared once, in its stage module, as a `Command` with an options
dataclass (see `core.options`); this module turns the declarations into argparse
subcommands (a field `batch_size` is the flag `--batch-size`, one-letter fields also get
`-k`), and `command_line` turns options back into the flags the Snakefile runs.

This is the only module that speaks in flags: a `ParamError` naming a parameter is
reported with its flag. A user mistake (FeatscopeError) prints one line on stderr and
exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core import options as opts
from featscope.pipelines.core.atomic import meant
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.version import FEATSCOPE_VERSION

# The first word of every command -> the module(s) that declare it (their `COMMANDS`), in the
# order `featscope --help` lists them. A command imports only its own module, so the stages
# without a model (manifest, index, neighbours, mosaic, report, ...) never load torch.
COMMAND_MODULES = {
    "data": "featscope.pipelines.data.demo",
    "weights": "featscope.pipelines.data.weights",
    "manifest": "featscope.pipelines.stages.manifest",
    "extract": "featscope.pipelines.stages.extract",
    "index": "featscope.pipelines.stages.index",
    "query": "featscope.pipelines.stages.index",
    "neighbours": "featscope.pipelines.stages.neighbours",
    "topk": "featscope.pipelines.stages.topk",
    "embed": "featscope.pipelines.stages.embed",
    "mosaic": "featscope.pipelines.stages.mosaic",
    "saliency": ("featscope.pipelines.stages.saliency", "featscope.pipelines.stages.saliency_trust"),
    "explain": "featscope.pipelines.stages.explain",
    "units": ("featscope.pipelines.stages.units", "featscope.pipelines.stages.atlas"),
    "viz": "featscope.pipelines.stages.viz",
    "style": "featscope.pipelines.stages.style",
    "report": "featscope.pipelines.app.report",
    "serve": "featscope.pipelines.app.serve",
    "status": "featscope.pipelines.app.status",
    "verify": "featscope.pipelines.app.verify",
    "clean": "featscope.pipelines.app.clean",
    "config": "featscope.pipelines.app.config_command",
}
# What each first word does, for `featscope --help`, which lists them without importing any
# stage. For a group it is the group's help; for a single command it repeats the command's
# own `help` (tests/pipelines/test_declarations.py checks that they agree).
WORD_HELP = {
    "data": "prepare datasets",
    "weights": "manage model weights",
    "manifest": "list a dataset's images with stable ids and shards",
    "extract": "extract layer features of a run's images into Parquet",
    "index": "FAISS index of a layer's features",
    "query": "nearest images to an image of the run or a new image file",
    "neighbours": "a JPEG sheet of neighbours in feature space and pixel space",
    "topk": "each unit's maximally activating images and patches",
    "embed": "2-D maps of a layer by PCA and t-SNE (openTSNE)",
    "mosaic": "draw the images on a layer's t-SNE map",
    "saliency": "which pixels matter: saliency maps of a run's images (with Dask), their faithfulness and "
                "sanity checks",
    "units": "what each unit means: feature visualisations, labels and classes, an activation atlas",
    "explain": "why two images are neighbours: a map on each of its regions' share of their similarity",
    "viz": "the visualisation toolbox: filters, activations, class models, adversarial examples, DeepDream, "
           "feature inversion, textures, style transfer",
    "style": "fast feed-forward style transfer with conditional instance norm",
    "report": "a static HTML report of a run (open report/index.html from disk)",
    "serve": "serve a run's report and a JSON query API on 127.0.0.1",
    "status": "where a run stands and what a rerun of the workflow would do",
    "verify": "read every file of a run back; name each damaged one and the command that rebuilds it",
    "clean": "delete the temporary files and index versions that killed jobs left in a run",
    "config": "the workflow config: its schema",
}
# Old command names kept working for this release.
ALIASES = {"neighbors": "neighbours"}  # the US spelling, for this release
# Groups whose bare word used to be a command: `featscope saliency --run R --method M` still
# means `featscope saliency compute ...`.
BARE_GROUPS = {"saliency": "compute"}


def commands(first_word: str | None = None) -> dict[str, opts.Command]:
    """Every command by its words ("index build"), or only those starting with `first_word`
    (importing only the module that declares them)."""
    words = [first_word] if first_word else list(COMMAND_MODULES)
    modules = list(dict.fromkeys(m for w in words for m in _as_tuple(COMMAND_MODULES[w])))
    found: dict[str, opts.Command] = {}
    for name in modules:
        for command in importlib.import_module(name).COMMANDS:
            if first_word is None or command.name.split()[0] == first_word:
                found[command.name] = command
    return dict(sorted(found.items(), key=lambda item: list(COMMAND_MODULES).index(item[0].split()[0])))


def _as_tuple(modules: str | tuple[str, ...]) -> tuple[str, ...]:
    return (modules,) if isinstance(modules, str) else modules


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument_type(spec: opts.Spec):
    """Converts the text of a flag; ranges and choices are checked when the options are built,
    so every such error reads `--flag must ...`."""
    def convert(text: str):
        try:
            return spec.convert(text)
        except ParamError as e:
            raise argparse.ArgumentTypeError(e.said_as(flag).split(" ", 1)[1]) from None
    convert.__name__ = spec.type_name  # argparse names the type in its error
    return convert


def _add_option(parser, spec: opts.Spec) -> None:
    help_text = spec.help.replace("%", "%%")  # argparse formats help with %
    if spec.default not in (None, False, []) and not spec.required:
        shown = ",".join(map(str, spec.default)) if spec.is_list else spec.default
        help_text += f" (default: {shown})"
    if spec.positional:
        parser.add_argument(spec.name, nargs="+" if spec.is_list else None, help=help_text,
                            type=_argument_type(opts.spec_of(spec.name, spec.type, None, spec.param)))
        return
    names = [flag(spec.name)] + ([f"-{spec.name}"] if len(spec.name) == 1 else [])
    if spec.type is bool and not spec.is_list:
        parser.add_argument(*names, dest=spec.name, action=argparse.BooleanOptionalAction, default=spec.default,
                            help=help_text)
        return
    kwargs = {"dest": spec.name, "help": help_text, "required": spec.required}
    if spec.param.choices and not spec.is_list:
        kwargs["choices"] = spec.param.choices
    if spec.is_list and spec.spaced:
        kwargs |= {"nargs": "+", "type": _argument_type(opts.spec_of(spec.name, spec.type, None, spec.param))}
    else:
        kwargs |= {"type": _argument_type(spec), "metavar": spec.name.upper() if spec.is_list else None}
    parser.add_argument(*names, default=spec.default, **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def _top_parser() -> _Parser:
    parser = _Parser(
        prog="featscope",
        description="Dataset-scale analysis of what CNNs learn. Each subcommand is one pipeline stage "
                    "working on a run directory (runs/<name>/); the Snakefile chains them.",
    )
    parser.add_argument("--version", action="version", version=f"featscope {FEATSCOPE_VERSION}")
    return parser


def word_parser() -> argparse.ArgumentParser:
    """The top level alone: every first word with its help, no stage imported (`--help`,
    `--version`, and the one-line error for an unknown command)."""
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for word, text in WORD_HELP.items():
        sub.add_parser(word, help=text, aliases=[old for old, new in ALIASES.items() if new == word], add_help=False)
    return parser


def build_parser(first_word: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or (given the command's first word) just that command's part of it."""
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in commands(first_word).items():
        first, _, second = name.partition(" ")
        if second:
            if first not in groups:
                groups[first] = sub.add_parser(first, help=WORD_HELP[first]).add_subparsers(
                    dest="what", required=True, metavar="WHAT", parser_class=_Parser)
            where, word = groups[first], second
        else:
            where, word = sub, first
        aliases = [old for old, new in ALIASES.items() if new == name]
        p = where.add_parser(word, help=command.help, description=command.description or command.help,
                             aliases=aliases)
        if command.needs_run:
            p.add_argument("--run", required=True, type=Path, help="run directory, e.g. runs/NAME")
        grouped = {n: g for g in command.groups for n in g.names}
        containers = {g: p.add_mutually_exclusive_group(required=g.required) for g in command.groups}
        for spec in opts.specs(command.options):
            _add_option(containers[grouped[spec.name]] if spec.name in grouped else p, spec)
        if "progress" in inspect.signature(command.run).parameters:
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(command_obj=command)
    return parser


def command_line(name: str, options: opts.Options, *, executable: str = "featscope", **fixed: str) -> str:
    """The shell command that runs command `name` with `options`; only values that differ
    from the defaults are written. `fixed` adds flags that are no option of the command, as
    given: `run=PATH` becomes `--run PATH`, `quiet=""` becomes `--quiet`."""
    words = [executable, *name.split()]
    for key, value in fixed.items():
        words.append(flag(key) if value == "" else f"{flag(key)} {value}")
    for spec in opts.specs(type(options)):
        value = getattr(options, spec.name)
        if value == spec.default or value is None:
            continue
        if spec.type is bool and not spec.is_list:
            words.append(flag(spec.name) if value else "--no-" + spec.name.replace("_", "-"))
            continue
        if spec.is_list:
            text = " ".join(shlex.quote(str(v)) for v in value) if spec.spaced or spec.positional \
                else shlex.quote(",".join(map(str, value)))
        else:
            text = shlex.quote(str(value))
        words.append(text if spec.positional else f"{flag(spec.name)} {text}")
    return " ".join(words)


def parse(argv: list[str]) -> tuple[opts.Command, argparse.Namespace, opts.Options]:
    """argv -> (command, raw namespace, its options), or exit 2 with one line."""
    first = next((a for a in argv[:1] if a in COMMAND_MODULES), None)
    if first is None:
        word_parser().parse_args(argv)  # --help, --version or an error: each exits here
    parser = build_parser(first)
    args = parser.parse_args(argv)
    command = args.command_obj
    values = {s.name: getattr(args, s.name) for s in opts.specs(command.options)}
    return command, args, command.options(**values)


def _stage_name(command: opts.Command, options: opts.Options) -> str:
    """e.g. extract-shard-00003, index-build-pool, saliency-occlusion, viz-dream."""
    parts = command.name.split()
    for key in ("method", "layer"):
        if getattr(options, key, None):
            parts.append(str(getattr(options, key)))
    if len(getattr(options, "methods", None) or []) == 1:  # saliency evaluate, one job per method
        parts.append(options.methods[0])
    if getattr(options, "shard", None) is not None:
        parts.append(f"shard-{options.shard:05d}")
    return "-".join(parts).replace("/", "_")


class Stopped(BaseException):
    """SIGTERM (a cluster's `scancel` or requeue, Snakemake stopping its jobs), raised where
    the command is, so that every `finally` and `except BaseException` on the way out
    removes its temporary files (a half-written feature part can be hundreds of MB) and lets
    go of its locks, instead of the process vanishing mid-write. A BaseException, so that no
    `except Exception` takes it for an error to handle and carries on."""


@contextmanager
def _sigterm_stops(enabled: bool) -> Iterator[None]:
    """Within the block, SIGTERM raises `Stopped` (once: a second one during the clean-up is
    ignored, and SIGKILL still ends it). Only on the main thread, where signals arrive."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped()

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    """The `featscope` command; its exit status. Output piped into a reader that stops early
    (`featscope status ... | head`) ends quietly, not with a traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a second one as Python exits
        return 141  # as a shell reports a command that a closed pipe stopped (128 + SIGPIPE)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = [ALIASES.get(a, a) if i == 0 else a for i, a in enumerate(argv)]
    if len(argv) > 1 and argv[0] in BARE_GROUPS and argv[1].startswith("--") and argv[1] != "--help":
        argv = [argv[0], BARE_GROUPS[argv[0]], *argv[1:]]
    try:
        command, args, options = parse(argv)
    except ParamError as e:
        print(f"featscope: error: {e.said_as(flag)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    run = getattr(args, "run", None)
    call = {"progress": not args.quiet} if "progress" in inspect.signature(command.run).parameters else {}
    try:
        if run is not None:
            _check_run_path(run)
        with _sigterm_stops(enabled=command.name != "serve"):  # serve shuts down gracefully on its own
            result = command.run(RunDir(run), options, **call) if command.needs_run else command.run(options, **call)
    except (Stopped, KeyboardInterrupt) as e:
        how = "stopped by SIGTERM" if isinstance(e, Stopped) else "interrupted (Ctrl-C)"
        print(f"featscope: {command.name} {how}: its temporary files are removed, and no output was left "
              "half-written; run it again to finish", file=sys.stderr)
        return 143 if isinstance(e, Stopped) else 130  # as a shell reports it: 128 + SIGTERM's 15 or SIGINT's 2
    except ParamError as e:
        print(f"featscope: error: {e.said_as(flag)}", file=sys.stderr)
        return 2
    except FeatscopeError as e:
        print(f"featscope: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing folder: the path, and what to do
        what = "free some space there" if e.errno == errno.ENOSPC else "check it and its permissions"
        where = meant(e.filename) if isinstance(e.filename, (str, Path)) else run
        print(f"featscope: error: {e.strerror or e} at {where}: {what}", file=sys.stderr)
        return 2
    finally:  # after a stop or an error too: the outputs it put in place before that stay
        if run is not None and command.records_timing:
            _refresh_outputs_script(RunDir(run))
    if result is not None:
        print(result if isinstance(result, str) else result.line())
        warning = getattr(result, "warning", None)
        if callable(warning) and warning():
            print(f"warning: {warning()}", file=sys.stderr)
    failed = bool(getattr(result, "failed", False))  # a run in which every item it tried failed
    if run is not None and command.records_timing and RunDir(run).run_json.exists():
        from featscope.pipelines.core.timings import record

        try:
            record(RunDir(run), _stage_name(command, options), time.perf_counter() - start)
        except OSError as e:  # the work is done; a record that cannot be written never fails it
            print(f"warning: timing not recorded ({e.strerror or e})", file=sys.stderr)
    return 1 if failed else 0


def _refresh_outputs_script(rd: RunDir) -> None:
    """After a command that may have written outputs (or some, before it failed): the stamp a
    report opened from disk compares its own with, so it says what changed since."""
    from featscope.pipelines.core import derived

    try:
        derived.write_outputs_script(rd)
    except OSError as e:  # a stamp that cannot be written never fails the work
        print(f"warning: {rd.outputs_script.name} not updated ({e.strerror or e}): a report opened from disk "
              "may not say which outputs changed since it was built", file=sys.stderr)


def _check_run_path(run: Path) -> None:
    """A run directory must be a folder, or creatable as one: not a file, nor under a file."""
    if run.exists() and not run.is_dir():
        raise ParamError("run", f"{run} is a file, not a run directory")
    for parent in run.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ParamError("run", f"{run} cannot be a run directory: {parent} is a file")
            break


if __name__ == "__main__":
    sys.exit(main())
