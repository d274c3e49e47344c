"""How any stage runs: shard markers, the run layout, the local shard executor, the Spark
launcher and the status that dashboards and ``mofi status`` read.

Stages (``pipeline_tasks.ner``, ``.scoring``, ``.vocab``, ``.write``, ...) say *what* a shard
is and how to process one; this package says how shards are planned, skipped when done,
fanned out, published and accounted for, the same way for every stage.
"""
