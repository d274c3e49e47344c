"""The demo: a user of the system, not part of it.

It makes the demo's raw input (a noisy image/alt-text corpus in img2dataset's layout, with
its ground truth and a held-out evaluation folder) from real pictures with human captions.
Production code never imports this package; the ``mofi corpus`` and ``mofi fetch-stamps``
commands do, when they run.
"""
