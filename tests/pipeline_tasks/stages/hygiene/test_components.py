"""The hygiene job's near-duplicate groups, found in Spark (large-star / small-star rounds, for
copy pairs too many for the driver) and on the driver: the same groups, the same labels."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_tasks.stages.hygiene import job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    from pipeline_tasks.runtime.spark import spark_env

    with pytest.MonkeyPatch.context() as mp:  # the interpreter and address the job would use
        for k, v in spark_env().items():
            if k.startswith(("PYSPARK", "SPARK")):
                mp.setenv(k, v)
        s = (
            SparkSession.builder.master("local[2]")
            .appName("test-hygiene-components")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.local.dir", str(tmp_path_factory.mktemp("spark")))
            .getOrCreate()
        )
        yield s
        s.stop()


def test_groups_in_spark_and_on_the_driver_agree(spark):
    rng = np.random.default_rng(5)
    names = np.array([f"{i % 7:05d}/{i:06d}" for i in rng.permutation(2200)], dtype=object)
    edges = []
    for _ in range(10):  # short chains, a star, random pairs
        chain = rng.choice(2000, 12, replace=False)
        edges += [(chain[k], chain[k + 1]) for k in range(11)]
    edges += [(1999, x) for x in rng.choice(1999, 30, replace=False)]
    # a group of its own: a chain of 200 (label propagation needed more than 50 rounds)
    chain = 2000 + rng.permutation(200)
    edges += [(chain[k], chain[k + 1]) for k in range(199)]
    edges += [tuple(e) for e in rng.integers(0, 2000, (300, 2)) if e[0] != e[1]]
    a, b = names[[e[0] for e in edges]], names[[e[1] for e in edges]]
    df = spark.createDataFrame(list(zip(a.tolist(), b.tolist(), strict=True)), "a string, b string")
    in_spark = {r["id"]: r["label"] for r in job.components(spark, df, on_driver=False).collect()}
    on_driver = {r["id"]: r["label"] for r in job.components(spark, df, on_driver=True).collect()}
    assert in_spark == on_driver
    assert len(in_spark) == len(set(a) | set(b)) and len(set(in_spark.values())) > 10
    assert all(label <= i for i, label in in_spark.items())
    assert len({in_spark[names[x]] for x in chain}) == 1  # the long chain: one group
