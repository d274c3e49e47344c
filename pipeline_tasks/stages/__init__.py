"""One package per stage of the I2E build, each a room of its own: the driver, the Spark job
or device worker, and the stage's own logic together.

* ``kb``: the knowledge base (its sources, the entity-name rules every later stage uses);
* ``ner``: mention finding and linking over raw captions (Spark);
* ``score``: image/entity similarity on the devices, with the scorer bootstrap and prompts;
* ``vocab``: the filter and the entity vocabulary (Spark);
* ``write``: the I2E WebDataset shards.

A stage imports only the stages before it and ``pipeline_tasks.runtime`` (checked by
``tests/test_architecture.py``); the order is ``runtime.layout.BUILD_STAGES``.
"""
