#!/usr/bin/env bash
# `make classifiers`: the shipped classifiers, trained one after the other (checkpoints/README.md).
# RESUME_AT=<Lightning checkpoint> resumes the robust model's training from that checkpoint.
set -euo pipefail
PY=${PY:-.venv/bin/python}
if [ -n "${RESUME_AT:-}" ]; then
  /usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_at.yaml --ckpt_path "$RESUME_AT"
else
  /usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_at.yaml
fi
/usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_std.yaml
