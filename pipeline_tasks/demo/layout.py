"""The demo's folders under RUN (``make demo``'s ``runs/demo``), and the settings that point a
local Airflow's DAGs at them.

::

    RUN/kb  RUN/raw  RUN/truth    the knowledge base, the corpus and its ground truth
    RUN/eval  RUN/val             held-out pictures: the test folder, WiSE-FT's validation folder
    RUN/photos_eval               real photographs (out of domain, `mofi photos`)
    RUN/v=VERSION/                build versions (the build DAG's ROOT is RUN)
    RUN/train/RUN_ID/             training runs (the train DAG's ROOT)
    RUN/results.sqlite            the results store; RUN/results.png its chart
    RUN/airflow/                  the local Airflow's home
"""

from __future__ import annotations

import dataclasses
import os

from training.core import storage

DAG_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dags")
DAG_BUNDLE = "mofi-demo"


@dataclasses.dataclass(frozen=True)
class DemoLayout:
    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.path.abspath(self.root))

    def _at(self, name: str) -> str:
        return os.path.join(self.root, name)

    kb = property(lambda self: self._at("kb"))
    raw = property(lambda self: self._at("raw"))
    eval = property(lambda self: self._at("eval"))
    val = property(lambda self: self._at("val"))
    photos = property(lambda self: self._at("photos_eval"))
    train = property(lambda self: self._at("train"))
    airflow = property(lambda self: self._at("airflow"))
    results_url = property(lambda self: f"sqlite:///{self._at('results.sqlite')}")
    results_png = property(lambda self: self._at("results.png"))

    def eval_folders(self) -> list[str]:
        """The evaluation folders that exist (the test folder when none does yet)."""
        return [f for f in (self.eval, self.photos) if os.path.isdir(f)] or [self.eval]

    def validation_folder(self) -> str | None:
        """The corpus's validation folder (WiSE-FT chooses its mixing weight there)."""
        return self.val if storage.list_files(self.val, suffix=".jpg") else None

    def airflow_env(
        self, eval_folders: list[str] | None = None, val_folder: str | None = None
    ) -> dict[str, str]:
        """The DAGs' parameter defaults for this demo (the DAG files read them from the
        dag-processor's environment): raw and kb in, versions under RUN, the demo's configs,
        training runs under RUN/train, results in RUN/results.sqlite; the dashboard watches
        RUN; ``val_folder`` turns WiSE-FT on."""
        folders = eval_folders or [self.eval]
        return {
            "MOFI_ROOT": self.root,
            "MOFI_RAW": self.raw,
            "MOFI_KB": self.kb,
            "MOFI_BUILD_CONFIG": "demo",
            "MOFI_TRAIN_CONFIG": "demo",
            "MOFI_TRAIN_ROOT": self.train,
            "MOFI_EVAL_IMAGES": ",".join(os.path.abspath(f) for f in folders),
            "MOFI_EVAL_BASELINE": "1",
            "MOFI_RESULTS_URL": self.results_url,
            "MOFI_DASHBOARD_ROOTS": self.root,
            "MOFI_VAL_IMAGES": os.path.abspath(val_folder) if val_folder else "",
        }

    def local_airflow(self, port: int | None = None, home: str | None = None, **env_args):
        """The demo's local Airflow: its home in RUN/airflow, the demo's DAG beside dags/."""
        from pipeline_tasks.orchestration.local_airflow import LocalAirflow

        return LocalAirflow(
            home or self.airflow,
            port,
            extra_env=self.airflow_env(**env_args),
            dag_folders={DAG_BUNDLE: DAG_FOLDER},
        )
