"""NER + knowledge-base linking over raw captions, as a Spark job.

* ``linking``: spaCy NER and the KB phrase matcher, candidate scoring (plain Python);
* ``job``: the spark-submit entry point (runs in the executors);
* ``stage``: the driver (`mofi ner`), the plan later stages take their inputs from, and the
  reader of this stage's output (:func:`~.stage.read_candidates`).
"""
