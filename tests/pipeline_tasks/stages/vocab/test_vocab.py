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


def test_the_calibrated_filter_keeps_labels_the_truth_confirms(built, tmp_path):
    """The default filter (threshold read off the null scores) producing a dataset: on the
    tiny corpus with its evidence requirement lowered to what 64 pairs give, the labels it
    keeps are checked against the corpus truth, and the I2E is written from them."""
    import glob

    import pyarrow.parquet as pq

    run = tmp_path / "run"
    shutil.copytree(os.path.join(built["run"], "ner"), run / "ner")
    shutil.copytree(os.path.join(built["run"], "score"), run / "score")
    c = built["config"].vocab.replace(
        threshold_mode="calibrated", min_null_pairs=8, min_count=1, min_kept_fraction=0.1
    )
    res = vocab.run_vocab(c, str(run), built["kb"], progress=False)
    res.raise_if_failed()
    truth = {}
    for f in glob.glob(os.path.join(built["truth"], "0*.parquet")):
        for r in pq.read_table(f).to_pylist():
            truth[r["key"]] = set(r["true_entity_ids"])
    kept = [(r["key"], e) for f in sorted(glob.glob(str(run / "labels" / "*.parquet")))
            for r in pq.read_table(f).to_pylist() for e in r["entity_ids"]]  # fmt: skip
    assert kept, "the calibrated filter kept nothing"
    right = sum(e in truth.get(k, set()) for k, e in kept)
    images = {k for k, _ in kept}
    recall = sum(bool(truth[k] & {e for kk, e in kept if kk == k}) for k in truth) / len(truth)
    print(f"calibrated: {len(kept)} labels on {len(images)} images, precision "
          f"{right / len(kept):.3f}, image recall {recall:.3f}")  # fmt: skip
    assert right / len(kept) >= 0.9 and recall >= 0.5
    out = write.run_write(built["config"].write, built["raw"], str(run), str(tmp_path / "i2e"))
    out.raise_if_failed()
    assert glob.glob(str(tmp_path / "i2e" / "*.tar"))
