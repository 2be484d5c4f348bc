"""Summary-line words: plurals and rates read right at every size."""

from featscope.pipelines.core.text import plural, rate


def test_plurals():
    assert [plural(n, "shard") for n in (0, 1, 2)] == ["0 shards", "1 shard", "2 shards"]
    assert plural(2, "image", "images of note") == "2 images of note"


def test_rates_keep_their_figures_at_any_speed():
    assert rate(3, 60) == "0.05 img/s"  # never '0 img/s'
    assert rate(16, 5) == "3.2 img/s"
    assert rate(5012, 14.3) == "350 img/s"
    assert rate(0, 2.0) == "- img/s" and rate(5, 0) == "- img/s"
    assert rate(1000, 1, "vec") == "1000 vec/s"
