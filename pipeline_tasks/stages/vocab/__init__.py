"""The filter and the entity vocabulary, as a Spark job.

* ``filtering``: each rule of the filter (coherence, calibrated threshold, min_count, the
  refusal of an empty output), tested on its own;
* ``job``: the spark-submit entry point: read, calibrate, filter, publish;
* ``stage``: the driver (`mofi vocab`), the output schemas and :func:`~.stage.load_vocab`.
"""
