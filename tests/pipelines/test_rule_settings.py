"""What decides a workflow rule's outputs: the tuning options left out, and the record whose
time reruns the rule when the config changes it (core.rule_settings)."""

from featscope.pipelines.core import rule_settings
from featscope.pipelines.core.options import deciding, specs
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages.extract import ExtractOptions
from featscope.pipelines.stages.saliency import SaliencyOptions
from featscope.pipelines.stages.saliency_trust import EvaluateOptions


def test_only_tuning_options_are_left_out_of_what_decides_the_outputs():
    ran = ExtractOptions(layers=["pool"], topk=5, batch_size=8, workers=0, threads=3, device="cpu")
    assert deciding(ran) == deciding(ExtractOptions(layers=["pool"], topk=5))
    assert deciding(ran) == {"layers": ["pool"], "topk": 5}  # no tuning option, no default
    assert deciding(ran) != deciding(ExtractOptions(layers=["pool"], topk=6))
    assert deciding(ran) != deciding(ExtractOptions(layers=["pool"], topk=5, precision="fp32"))
    sliced = SaliencyOptions(method="gradient", score="probability", workers=2, images_per_task=3, overwrite=True)
    assert deciding(sliced) == deciding(SaliencyOptions(method="gradient", score="probability"))
    tuning = {cls.__name__: sorted(s.name for s in specs(cls) if s.tuning)
              for cls in (ExtractOptions, SaliencyOptions, EvaluateOptions)}
    assert tuning == {
        "ExtractOptions": ["batch_size", "device", "threads", "workers"],
        "SaliencyOptions": ["device", "images_per_task", "overwrite", "scheduler", "slurm_account", "slurm_cores",
                            "slurm_gpus", "slurm_jobs", "slurm_memory", "slurm_partition", "slurm_walltime",
                            "threads", "workers"],
        "EvaluateOptions": ["batch", "device", "images_per_task", "scheduler", "threads", "workers"]}


def test_a_record_is_an_input_from_its_first_change_on(tmp_path):
    """Its first writing is no input (outputs there are count as made with it: listing a new
    input would rerun them all); a change rewrites it, newer than every output, and it stays
    an input."""
    rd = RunDir(tmp_path / "run")
    assert rule_settings.as_input(rd, "extract") == []
    assert rule_settings.record(rd, "extract", '{"topk": 5}') is False
    assert rd.rule_settings("extract").stat().st_mtime_ns == 0 and rule_settings.as_input(rd, "extract") == []
    assert rule_settings.record(rd, "extract", '{"topk": 5}') is False
    assert rule_settings.as_input(rd, "extract") == []
    assert rule_settings.record(rd, "extract", '{"topk": 6}') is True
    assert rule_settings.as_input(rd, "extract") == [str(rd.rule_settings("extract"))]
    changed = rd.rule_settings("extract").stat().st_mtime_ns
    assert changed > 0 and rd.rule_settings("extract").read_text() == '{"topk": 6}\n'
    assert rule_settings.record(rd, "extract", '{"topk": 6}') is False
    assert rd.rule_settings("extract").stat().st_mtime_ns == changed  # unchanged: nothing reruns


def test_a_first_record_reruns_the_rule_where_its_outputs_say_other_settings(tmp_path):
    """A run whose config changed before records were kept (top-k made 3 deep, the config
    asking 5) kept its old top-k as if current: the first record now reruns extract then."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rd = RunDir(tmp_path / "run")
    part = rd.topk_candidates_part("pool", 0)
    part.parent.mkdir(parents=True)
    pq.write_table(pa.table({"channel": [0]}).replace_schema_metadata({"k": "3"}), part)
    assert rule_settings.candidates_are(rd, ["pool"], 3) and not rule_settings.candidates_are(rd, ["pool"], 5)
    made_so = lambda: rule_settings.candidates_are(rd, ["pool"], 5)  # noqa: E731
    assert rule_settings.record(rd, "extract", '{"topk": 5}', made_so=made_so) is True
    assert rule_settings.as_input(rd, "extract") == [str(rd.rule_settings("extract"))]
    other = RunDir(tmp_path / "other")
    part = other.topk_candidates_part("pool", 0)
    part.parent.mkdir(parents=True)
    pq.write_table(pa.table({"channel": [0]}).replace_schema_metadata({"k": "5"}), part)
    assert rule_settings.record(other, "extract", '{"topk": 5}',
                                made_so=lambda: rule_settings.candidates_are(other, ["pool"], 5)) is False
    assert rule_settings.as_input(other, "extract") == []
