#!/usr/bin/env bash
# Allocator x purifier-path A/B of bench run 3 (README "Speed"): glibc with the Makefile's malloc
# settings vs mimalloc as the Makefile preloads it, alternated twice. About 4 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MI=$(ls .venv/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so | head -1)
G="MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824"
M="$G LD_PRELOAD=$(pwd)/$MI MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ALLOW_LARGE_OS_PAGES=1"
for round in 1 2; do
  for name in glibc mimalloc; do
    if [ "$name" = glibc ]; then E="$G"; else E="$M"; fi
    echo "round $round, $name: $(env $E $PY runs/allocator_ab.py speed 10 2 256 3)"
  done
done
for name in glibc mimalloc; do
  if [ "$name" = glibc ]; then E="$G"; else E="$M"; fi
  for path in lean plain; do
    echo "$name: $(env $E $PY runs/allocator_ab.py memory 2 4 512 $path)"
  done
done
