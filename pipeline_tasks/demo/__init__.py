"""The demo: a user of the system, not part of it.

It makes the demo's raw input (a noisy image/alt-text corpus in img2dataset's layout, with
its ground truth and a held-out evaluation folder) from real pictures with human captions.
Production code never imports this package; the ``mofi corpus`` and ``mofi fetch-stamps``
commands do, when they run.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_dir(name: str) -> str:
    """The one cache location of the demo's downloaded data (whatever the working directory):
    ``$MOFI_DATA_DIR/NAME``, else ``<repository>/data/NAME``."""
    return os.path.join(os.environ.get("MOFI_DATA_DIR") or os.path.join(REPO, "data"), name)
