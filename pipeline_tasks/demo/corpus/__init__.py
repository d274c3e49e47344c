"""Demo corpus: web-like noisy image/alt-text pairs in img2dataset's layout, with ground truth.

Real pictures with human captions (see :mod:`pipeline_tasks.demo.stamps`) become many
distinct samples: each sample re-renders a picture (crop, scale, flip, colour, background,
JPEG quality) and writes web-like alt-text around the mention of what it shows: the caption
phrase or the name of the KB entity it is linked to, mixed with photographer and agency
names, cameras, places and events, stock-photo boilerplate, hashtags, unrelated named
entities (KB people and places: the distractors), misspellings and casing noise.

Outputs (all written atomically, shard markers last):

* ``OUT/{shard:05d}.tar`` (key.jpg, key.txt, key.json) and ``OUT/{shard:05d}.parquet``
  (key, caption, url, width, height, status, ...), as img2dataset writes them;
* ``TRUTH/{shard:05d}.parquet``: key -> true entity ids, distractor entity ids, picture id,
  category. No pipeline stage reads it; benchmarks do. ``TRUTH/stamps.parquet`` holds the
  picture -> entity linking and the train/eval split;
* ``EVAL/{class_id}_{picture}.jpg``: held-out pictures never used in the training pairs,
  named as GPR1200 names its images, and ``EVAL/classes.json``.

Sample ``i`` of shard ``s`` draws from ``numpy.random.default_rng([seed, s, i])``, so the
output is the same for a seed however the shards are spread over workers.

One job per module: ``config`` (the config and the output schemas), ``truth`` (which KB
entity each picture shows, and the train/eval/val split), ``alt_text`` (the noisy caption
around a mention), ``render`` (a picture re-rendered), ``stage`` (one shard written),
``build`` (`mofi corpus`).
"""

from .build import build_corpus
from .config import CorpusConfig

__all__ = ["CorpusConfig", "build_corpus"]
