"""The GPU path (pinned memory, non_blocking copies, autocast) gives the CPU's features."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import column_array
from featscope.pipelines.stages import extract


def features(rd, layer):
    table = pq.read_table(rd.features_dir(layer)).sort_by("image_id")
    return column_array(table, "feature").astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_cuda_features_match_cpu_fp32(tmp_path, small_dataset, precision):
    out = {}
    for device, prec in (("cpu", "fp32"), ("cuda", precision)):
        rd = RunDir(tmp_path / device)
        manifest.run(rd, small_dataset)
        summary = extract.extract(rd, ["pool", "layer3"], model="resnet18", weights="random", device=device,
                              precision=prec, progress=False)
        assert summary.device == device
        out[device] = features(rd, "pool")
    a, b = out["cpu"], out["cuda"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > (0.9999 if precision == "fp32" else 0.99)
