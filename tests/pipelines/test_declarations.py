"""One declaration per command: the CLI, the config schema and the Snakefile agree with it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from featscope.pipelines.app import cli, config
from featscope.pipelines.core import options as opts

REPO = Path(__file__).resolve().parents[2]
COMMANDS = cli.commands()


def _subparser(parser, words):
    for word in words:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[word]
    return parser


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_a_flag_with_the_same_default_and_choices(name):
    parser = _subparser(cli.build_parser(), name.split())
    actions = {a.dest: a for a in parser._actions}
    for spec in opts.specs(COMMANDS[name].options):
        action = actions[spec.name]
        if spec.positional:
            assert action.option_strings == []
            continue
        assert cli.flag(spec.name) in action.option_strings
        assert action.default == spec.default, spec.name
        if spec.param.choices and not spec.is_list:
            assert tuple(action.choices) == spec.param.choices, spec.name
        assert action.required == spec.required, spec.name
    if COMMANDS[name].needs_run:
        assert actions["run"].required


def _sections(node, path=()):
    """(dotted path, section schema) of every schema section that names a command."""
    if isinstance(node, dict):
        if "x-options" in node:
            yield ".".join(path), node
        for key, value in node.get("properties", {}).items():
            yield from _sections(value, (*path, key))


RAW = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
FULL = config.schema()


@pytest.mark.parametrize("where, raw", list(_sections(RAW)), ids=[w for w, _ in _sections(RAW)])
def test_every_config_key_of_a_stage_is_an_option_or_a_declared_workflow_key(where, raw):
    command = COMMANDS[raw["x-options"]]
    fields = {s.name: s for s in opts.specs(command.options)}
    fixed = set(raw.get("x-fixed", []))
    assert fixed <= set(fields), f"x-fixed names no option: {fixed - set(fields)}"
    workflow_keys = set(raw.get("properties", {}))
    assert not (workflow_keys & (set(fields) - fixed)), "a workflow key shadows an option"
    section = FULL
    for key in where.split("."):
        section = section["properties"][key]
    assert set(section["properties"]) == workflow_keys | (set(fields) - fixed)
    for name in set(fields) - fixed:
        spec, prop = fields[name], section["properties"][name]
        assert prop.get("default") == (spec.default if not isinstance(spec.default, Path) else str(spec.default)) \
            or (spec.default is None and "default" not in prop), name
        body = prop["anyOf"][0] if "anyOf" in prop else prop
        body = body["items"] if spec.is_list else body
        if spec.param.choices:
            assert tuple(body["enum"]) == spec.param.choices, name


def test_saliency_methods_come_from_the_kernels_in_cli_schema_and_snakefile():
    from featscope.kernels.saliency import METHODS

    choices = opts.specs(COMMANDS["saliency compute"].options)[0].param.choices
    assert set(choices) == set(METHODS) >= {"integrated_gradients", "guided_gradcam"}
    assert FULL["properties"]["saliency"]["properties"]["methods"]["items"]["enum"] == list(choices)
    names = {s.name for s in opts.specs(COMMANDS["saliency compute"].options)}
    assert {"steps", "baseline", "window", "fill", "samples", "layer"} <= names  # the kernels' parameters


def test_snakefile_commands_of_the_demo_config_parse_back_into_the_configured_options(tmp_path):
    """Every command Snakemake would run for the demo config, parsed by the CLI, gives the
    options that the config section and the workflow's fixed values declare."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text()) | {"runs_dir": str(tmp_path / "runs")}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(demo))  # a fresh run, whatever runs/ holds
    done = subprocess.run([snakemake, "-n", "-p", "--cores", "2", "--configfile", str(tmp_path / "demo.yaml"),
                           "--directory", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split("Shell command: ", 1)[-1] for line in (done.stdout + done.stderr).splitlines()]
    calls = [part.strip() for line in lines if "featscope " in line for part in line.split("&&")]
    cfg = config.load(tmp_path / "demo.yaml")
    checked = set()
    for call in calls:
        words = shlex.split(call)[1:]
        command, args, parsed = cli.parse(words)
        section = {"extract": cfg["extract"], "index build": cfg["index"], "embed": cfg["embed"],
                   "saliency compute": cfg["saliency"], "saliency evaluate": cfg["saliency"]["evaluate"],
                   "saliency sanity": cfg["saliency"]["sanity"], "explain": cfg["explain"],
                   "units label": cfg["units"]["label"], "units render": cfg["units"]["render"],
                   "units atlas": cfg["units"]["atlas"], "topk render": cfg["topk"], "style train": cfg["style_net"],
                   "viz class-model": cfg["viz"]["class_models"], "viz dream": cfg["viz"]["dream"],
                   "viz invert": cfg["viz"]["inversion"], "viz adversarial": cfg["viz"]["adversarial"],
                   "viz texture": cfg["viz"]["texture"], "viz activations": cfg["viz"]["activations"],
                   }.get(command.name, {})
        fixed = {k: v for k, v in vars(parsed).items() if k not in section or k in {"layer", "method", "k"}
                 and command.name == "topk render"}
        expected = config.options_for(section, command, **fixed)
        assert parsed == expected, (call, parsed, expected)
        checked.add(command.name)
    assert {"manifest", "index build", "saliency compute", "saliency evaluate", "saliency sanity", "explain",
            "units label", "units render", "units atlas", "embed", "topk render", "viz dream",
            "style train"} <= checked


def test_each_first_word_names_its_module_and_its_help():
    words = {name.split()[0] for name in COMMANDS}
    assert set(cli.COMMAND_MODULES) == set(cli.WORD_HELP) == words
    for name, command in COMMANDS.items():
        first = name.split()[0]
        assert name in cli.commands(first)  # found through its own module alone
        if " " not in name:
            assert cli.WORD_HELP[first] == command.help, name  # the top-level listing repeats it


def test_commands_without_a_model_start_without_torch():
    """`featscope --help` and the stages that run no model import neither torch nor openTSNE."""
    code = ("import sys\n"
            "from featscope.pipelines.app import cli\n"
            "cli.word_parser()\n"
            "for word in ('manifest', 'index', 'neighbours', 'mosaic', 'report', 'config'):\n"
            "    cli.build_parser(word)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'openTSNE') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
