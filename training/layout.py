"""A training run's folder: the one place that names what ``mofi train`` writes there.

::

    OUT/train.request.json        the resolved config every rank reads (``mofi train``)
    OUT/_lease[.NODE].json        the run (or node) holding OUT (one training run per folder)
    OUT/train.config.json         the config the run trained with
    OUT/checkpoints/step_N.pt     training states, atomic, resumable
    OUT/metrics.jsonl             one line per optimiser step (the dashboard's curves)
    OUT/tb/                       TensorBoard events
    OUT/model.pt                  the final dual encoder: what eval and scoring load
    OUT/model.wise.pt             its WiSE-FT mix (``mofi wise-ft``)
    OUT/eval/MODEL.FOLDER.metrics.json   evaluations of the run's models (``mofi eval``)

The trainer, the launcher, WiSE-FT, evaluation, the train DAG and the dashboard all ask
:class:`TrainLayout` for these names.
"""

from __future__ import annotations

import dataclasses

from .core import storage

MODEL_FILE = "model.pt"
WISE_MODEL_FILE = "model.wise.pt"
METRICS_LOG = "metrics.jsonl"
CONFIG_FILE = "train.config.json"
REQUEST_FILE = "train.request.json"
LEASE_FILE = "_lease.json"
CHECKPOINT_DIR = "checkpoints"
TB_DIR = "tb"
EVAL_DIR = "eval"


@dataclasses.dataclass(frozen=True)
class TrainLayout:
    root: str

    @classmethod
    def of_model(cls, model_uri: str) -> TrainLayout:
        """The run folder a model file lies in."""
        model_uri = str(model_uri)
        return cls(model_uri.rsplit("/", 1)[0] if "/" in model_uri else ".")

    def _at(self, name: str) -> str:
        return storage.join(self.root, name)

    @property
    def model(self) -> str:
        return self._at(MODEL_FILE)

    @property
    def wise_model(self) -> str:
        return self._at(WISE_MODEL_FILE)

    @property
    def metrics(self) -> str:
        return self._at(METRICS_LOG)

    @property
    def config(self) -> str:
        return self._at(CONFIG_FILE)

    @property
    def request(self) -> str:
        return self._at(REQUEST_FILE)

    @property
    def lease(self) -> str:
        return self._at(LEASE_FILE)

    def lease_of(self, node: str | None = None) -> str:
        """The lease of the run (``node`` None), or of one node of a multi-node run."""
        return self.lease if node is None else self._at(f"_lease.{node}.json")

    @property
    def checkpoints(self) -> str:
        return self._at(CHECKPOINT_DIR)

    @property
    def tb(self) -> str:
        return self._at(TB_DIR)

    def checkpoint(self, step: int) -> str:
        return storage.join(self.checkpoints, f"step_{step:08d}.pt")

    def list_checkpoints(self) -> list[tuple[int, str]]:
        """(step, URI) of every training state, oldest first."""
        out = []
        for uri in storage.list_files(self.checkpoints, suffix=".pt"):
            name = storage.basename(uri)
            if name.startswith("step_"):
                try:
                    out.append((int(name[5:-3]), uri))
                except ValueError:
                    continue
        return sorted(out)

    def eval_metrics(self, model: str, folder: str) -> str:
        """The metrics of ``model`` (a file stem like ``model``, or ``packaged``) on an
        evaluation folder named ``folder``."""
        return storage.join(self.root, EVAL_DIR, f"{model}.{folder}.metrics.json")
