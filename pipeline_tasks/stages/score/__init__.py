"""Scoring: CLIP-style similarity between each image and its candidate entities.

One job per module:

* ``config``: :class:`ScoreConfig` and the scorer bootstrap's :class:`BootstrapConfig`;
* ``prompts``: the texts every entity is scored (and the scorer bootstrapped) against;
* ``bootstrap``: trains the packaged scorer's heads on the corpus (LiT), when it is missing;
* ``backends``: the scorers behind one interface (open_clip, packaged, mofi);
* ``embeddings``: entity text embeddings, once per entity and scorer, cached on storage;
* ``images``: the image stream (raw tars -> uint8 batches with candidates);
* ``device_decode``: JPEG batches decoded on the GPU;
* ``worker``: the per-device worker (a ``runtime`` shard stage);
* ``stage``: the driver (`mofi score`) and the one scorer-bootstrap rule.
"""
