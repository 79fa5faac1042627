#!/usr/bin/env bash
# The shipped classifiers, trained in sequence on this 2-core machine (see checkpoints/README.md).
set -euo pipefail
export REVLIT_DATA_DIR=${REVLIT_DATA_DIR:-../shared/datasets}
PY=${PY:-.venv/bin/python}
/usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_at.yaml
/usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_std.yaml
