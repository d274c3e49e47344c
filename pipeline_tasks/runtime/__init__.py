"""How any stage runs: shard markers, the run layout (with the one ordered list of stages),
the raw input contract, the local shard executor, the Spark stage runner and the status that
dashboards and ``mofi status`` read.

Stages (``pipeline_tasks.stages.*``) say *what* a shard is and how to process one; this
package says how shards are planned, skipped when done, fanned out, published and accounted
for, the same way for every stage. It imports no stage.
"""
