#!/usr/bin/env bash
# After the defended evaluation: full-test-set numbers of the robust classifier, then the standard
# classifier (resumed from its epoch-0 Lightning checkpoint: the first attempt was starved by
# concurrent jobs) and its SSL head. Sequential: concurrent 2-thread jobs on 2 cores stall.
set -uo pipefail
export REVLIT_DATA_DIR=${REVLIT_DATA_DIR:-../shared/datasets}
PY=${PY:-.venv/bin/python}
while pgrep -f "revlit.evaluate --n 1000" >/dev/null; do sleep 5; done
echo "== test robust (10k) $(date -u +%H:%M:%S)"
$PY cli.py test --config configs/classifier/test_shipped.yaml > runs/test_resnet20_at_full.log 2>&1
echo "== std classifier $(date -u +%H:%M:%S)"
/usr/bin/time -v $PY cli.py fit --config configs/classifier/resnet20_std.yaml --ckpt_path "$STD_RESUME" > runs/train_resnet20_std.resume.log 2>&1
echo "== ssl head (std) $(date -u +%H:%M:%S)"
/usr/bin/time -v $PY cli.py fit --config configs/ssl/resnet20_std.yaml > runs/ssl_resnet20_std.log 2>&1
echo "== done $(date -u +%H:%M:%S)"
