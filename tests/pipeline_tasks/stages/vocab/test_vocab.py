"""The vocab stage over the shared build (``built``): what it refuses and why."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline_tasks.stages.vocab import stage as vocab
from pipeline_tasks.stages.write import stage as write

pytestmark = pytest.mark.slow


def test_too_small_to_calibrate_is_refused_with_the_reason(built, tmp_path):
    """The calibrated filter on a corpus of 64 pairs: a clear failure, shown by status, and
    no vocabulary or labels published (never an empty or skewed I2E)."""
    from pipeline_tasks.runtime import status
    from pipeline_tasks.stages.vocab.filtering import FilterError

    run = tmp_path / "run"
    shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
    shutil.copytree(os.path.join(built["run"], "score"), run / "score")
    c = built["config"].vocab.replace(threshold_mode="calibrated")
    with pytest.raises(FilterError, match="cannot calibrate the filter: only \\d+ null scores"):
        vocab.run_vocab(c, str(run), built["kb"], progress=False)
    assert not (run / "vocab" / "vocab.parquet").exists()
    (s,) = [s for s in status.summarize_run(str(run)) if s["stage"] == "vocab"]
    assert s["failed"] == 1 and "vocab.min_null_pairs" in s["failed_shards"]["00000"]
    with pytest.raises(FileNotFoundError, match="run `mofi vocab` first|labels are incomplete"):
        write.run_write(built["config"].write, built["raw"], str(run), str(tmp_path / "i2e"))
