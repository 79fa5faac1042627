# bench run 7b: `make bench`'s command with 5 repetitions (firmer medians), same purifier and PGD code as run 7
# (the first try without REVLIT_DATA_DIR lost 39 min of timings when the DDP child found no CIFAR-10)
cd /work/main
export LD_PRELOAD=$(ls .venv/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so) MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ALLOW_LARGE_OS_PAGES=1
export REVLIT_DATA_DIR=$(cd .. && pwd)/shared/datasets
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
date -u +%FT%TZ > /tmp/p/b7b.start
.venv/bin/python -m revlit.bench --ddp --reps 5 --out docs/bench/bench_session7b.json > /tmp/p/b7b.log 2>&1
date -u +%FT%TZ > /tmp/p/b7b.end
