#!/usr/bin/env bash
# The shipped classifiers, trained in sequence on this 2-core machine (see checkpoints/README.md).
# RESUME_AT=<lightning ckpt> resumes the robust run (used once here after the job was starved by
# other processes; see checkpoints/README.md).
set -euo pipefail
export REVLIT_DATA_DIR=${REVLIT_DATA_DIR:-../shared/datasets}
PY=${PY:-.venv/bin/python}
if [ -n "${RESUME_AT:-}" ]; then
  /usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_at.yaml --ckpt_path "$RESUME_AT"
else
  /usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_at.yaml
fi
/usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_std.yaml
