# bench run 7: the full `make bench` (reference rows, memory, DDP) on the commit with the 0.25 s sampler
cd /work/main
date -u +%FT%TZ > /tmp/p/b7.start
make bench > /tmp/p/b7.log 2>&1
cp results/bench/bench.json docs/bench/bench_session7.json && cp results/bench/bench.md docs/bench/bench_session7.md
date -u +%FT%TZ > /tmp/p/b7.end
