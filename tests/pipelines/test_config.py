"""Config files are checked before any work, and errors name the key."""

import json
from pathlib import Path

import pytest
import yaml

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.app import config

REPO = Path(__file__).resolve().parents[2]


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def test_the_demo_config_is_valid_and_gets_defaults():
    cfg = config.load(REPO / "config" / "demo.yaml")
    assert cfg["model"]["arch"] == "mobilenet_v2" and cfg["model"]["seed"] == 0
    assert cfg["extract"]["batch_size"] == 64
    assert cfg["saliency"]["target"] == "predicted" and cfg["saliency"]["window"] == 32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["extract"].update(batch_size=0), r"extract\.batch_size: 0 is less than the minimum of 1"),
        (lambda c: c["extract"].update(device="tpu"), r"extract\.device: 'tpu' is not one of"),
        (lambda c: c.update(shard_sise=10), r"\(top level\): Additional properties are not allowed \('shard_sise'"),
        (lambda c: c.pop("layers"), r"'layers' is a required property"),
        (lambda c: c["model"].update(arch="resnet9000"), r"model\.arch: unknown architecture 'resnet9000'"),
        (lambda c: c.update(layers=["pool", "block99"]), r"layers\.1: unknown layer 'block99' for mobilenet_v2"),
        (lambda c: c["saliency"].update(methods=["lime"]), r"saliency\.methods\.0: 'lime' is not one of"),
        (lambda c: c["saliency"].update(select="photos"), r"saliency\.select: 'photos' does not match"),
        (lambda c: c["viz"]["dream"].update(layers=["block4", "conv5"]),
         r"viz\.dream\.layers\.1: unknown layer 'conv5' for mobilenet_v2"),
        (lambda c: c["viz"]["adversarial"].update(epsilon=0), r"viz\.adversarial\.epsilon: 0 is less than"),
        (lambda c: c["units"]["label"].update(layers=["block2"]),
         r"units\.label\.layers\.0: 'block2' is not one of the extracted layers"),
        (lambda c: c["units"]["atlas"].update(layers=["block99"]), r"units\.atlas\.layers\.0: unknown layer 'block99'"),
        (lambda c: c["units"]["atlas"].pop("layers"), r"units\.atlas: 'layers' is a required property"),
        (lambda c: c["units"]["render"].update(steps=0), r"units\.render\.steps: 0 is less than the minimum of 1"),
        (lambda c: c["units"].update(atlases={}), r"units: Additional properties are not allowed"),
        # runs_dir itself, or the folder above it (the repository): the run's files would land there
        (lambda c: c.update(run=".."), r"run: must be a folder name .*, not '\.\.'"),
        (lambda c: c.update(run="."), r"run: must be a folder name .*, not '\.'"),
        (lambda c: c.update(run="a/b"), r"run: must be a folder name"),
        # JSON Schema lets NaN pass every bound (.nan in YAML)
        (lambda c: c["embed"].update(perplexity=float("nan")), r"embed\.perplexity: must be a finite number, got nan"),
        (lambda c: c["units"]["render"].update(lr=float("inf")), r"units\.render\.lr: must be a finite number"),
    ],
)
def test_bad_configs_name_the_offending_key(change, message):
    cfg = demo_config()
    change(cfg)
    with pytest.raises(FeatscopeError, match=message):
        config.validate(cfg)


@pytest.mark.parametrize("text, message", [
    ("images: [unclosed\n", "line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow "
                            "sequence at line 1)"),
    ("a: 1\n  b: 2\n", "line 2, column 4: mapping values are not allowed here"),
])
def test_a_config_that_is_not_yaml_is_one_line_naming_the_place(tmp_path, text, message):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(FeatscopeError) as e:
        config.load(path)
    assert str(e.value) == f"cannot read config {path}: {message}"


@pytest.mark.parametrize("name, text, message", [
    ("my.yaml", "run: a\nlayers: [pool]\nrun: b\n", "line 3, column 1: 'run' is given twice in one mapping (first at "
                                                      "line 1): YAML would keep only the last"),
    ("my.yaml", "extract:\n  threads: 1\n  batch_size: 4\n  threads: 2\n",
     "line 4, column 3: 'threads' is given twice in one mapping (first at line 2): YAML would keep only the last"),
    ("my.yaml", "extract: {threads: 1, threads: 2}\n", "line 1, column 23: 'threads' is given twice in one mapping"),
    ("my.json", '{"run": "a", "run": "b"}', "'run' is given twice in one object: JSON readers keep only the last"),
])
def test_a_key_given_twice_is_refused_naming_the_place(tmp_path, name, text, message):
    """YAML and JSON readers (Snakemake's too) keep the last value of a repeated key, silently."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FeatscopeError) as e:
        config.read(path)
    assert str(e.value).startswith(f"cannot read config {path}: {message}")


def test_a_json_config_indented_with_tabs_is_read(tmp_path):
    """Snakemake reads JSON before YAML, and YAML refuses tabs: the check reads JSON first too."""
    path = tmp_path / "my.json"
    path.write_text('{\n\t"run": "a",\n\t"extract": {"threads": 2}\n}')
    assert config.read(path) == {"run": "a", "extract": {"threads": 2}}


def test_what_the_run_pins_is_refused_against_its_record(tmp_path):
    """Another precision than the features', another seed for random weights: refused by key
    when the workflow starts, before Snakemake deletes any output of a job that would refuse."""
    run_json = tmp_path / "run.json"
    cfg = config.validate({"images": "x", "run": "r", "model": {"arch": "resnet18", "weights": "random"},
                           "layers": ["pool"], "extract": {"precision": "fp32"}})
    config.check_against_run(cfg, run_json)  # a new run: anything goes
    run_json.write_text(json.dumps({"weights": "random", "weights_sha256": "ab", "seed": 0, "precision": "bf16"}))
    with pytest.raises(FeatscopeError, match=r"config error at extract.precision: run .* holds bf16 features"):
        config.check_against_run(cfg, run_json)
    for precision in ("bf16", "auto"):
        config.check_against_run(cfg | {"extract": {"precision": precision}}, run_json)
    with pytest.raises(FeatscopeError, match=r"config error at model.seed: .* drawn with seed 0, not 3; give 0"):
        config.check_against_run(cfg | {"extract": {}, "model": {"arch": "resnet18", "seed": 3}}, run_json)
    run_json.write_text(json.dumps({"weights": "imagenet", "weights_sha256": "ab", "seed": 0}))
    config.check_against_run(cfg | {"extract": {}, "model": {"arch": "resnet18", "seed": 3}}, run_json)  # no draw
