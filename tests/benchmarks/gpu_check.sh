#!/usr/bin/env bash
# Every GPU figure of issue 14 in one prepared command (gpu_check.py says what it measures).
#
#   bash tests/benchmarks/gpu_check.sh --prepare   # here: wheels for the GPU host's Python 3.12
#                                                  # into .whl/, the KB and the demo pictures
#                                                  # into .gpucheck/ (both git-ignored)
#   device run, carry [".whl", ".gpucheck"]:       bash tests/benchmarks/gpu_check.sh
#   dry run on this CPU (toy sizes, the same steps):
#       GPU_CHECK_DEVICE=cpu GPU_CHECK_PAIRS=600 PY=.venv/bin/python bash tests/benchmarks/gpu_check.sh
#
# The GPU host has torch, torchvision, pyarrow, pandas, PIL, timm and tqdm; open_clip and
# webdataset (and their small dependencies) travel as wheels. It reaches no network: the
# pictures and the KB travel too. The whole check is bounded to 5.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS="open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 webdataset==1.0.2 braceexpand==0.1.7"
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl .gpucheck
  for w in $WHEELS; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w"
  done
  [ -f .gpucheck/kb/entities.parquet ] || .venv/bin/mofi -q kb --out .gpucheck/kb
  [ -d .gpucheck/stamps ] || { .venv/bin/mofi -q fetch-stamps && cp -r "${MOFI_DATA_DIR:-data}/stamps" .gpucheck/stamps; }
  du -sh .whl .gpucheck
  exit 0
fi
PY=${PY:-python3}
if [ -d .whl ] && [ "${GPU_CHECK_DEVICE:-cuda}" = "cuda" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
rm -rf "$WORK"
mkdir -p "$OUTDIR"
timeout 330 "$PY" tests/benchmarks/gpu_check.py --kb .gpucheck/kb --stamps .gpucheck/stamps \
  --work "$WORK" --device "${GPU_CHECK_DEVICE:-cuda}" --pairs "${GPU_CHECK_PAIRS:-30000}" \
  --out "$OUTDIR/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUTDIR/gpu_check.log"
