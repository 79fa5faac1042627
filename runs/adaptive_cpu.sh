#!/usr/bin/env bash
# Issue 9 on the 2-core CPU: the n=500 table, then the eps sweep + convergence check on 100 images.
# Run from the repository root:  nohup bash runs/adaptive_cpu.sh > runs/adaptive_cpu.log 2>&1 &
set -uo pipefail
export REVLIT_DATA_DIR=${REVLIT_DATA_DIR:-../shared/datasets}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
for c in ${@:-cpu500 cpu_checks}; do
  echo "=== $c $(date +%T)"
  /usr/bin/time -f "%e s wall, %M KB peak RSS" .venv/bin/python cli.py test --config configs/adaptive/$c.yaml
done
echo "=== done $(date +%T)"
