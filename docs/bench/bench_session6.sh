# bench run 6 (reduced: no reference rows, no DDP; the default purifier at both settings and PGD-10)
cd /work/main
export LD_PRELOAD=$(ls .venv/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so) MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ALLOW_LARGE_OS_PAGES=1
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
date -u +%FT%TZ > /tmp/p/b6.start
.venv/bin/python - <<'PY' > /tmp/p/b6.log 2>&1
import json
from pathlib import Path
from revlit import bench
rec = bench.run_bench("resnet20", 3, purifier_settings=((40, 4, 512, ""), (10, 2, 256, "")), reference=False, memory=True)
Path("docs/bench/bench_session6.json").write_text(json.dumps(rec, indent=2))
t = bench.format_table(rec)
Path("docs/bench/bench_session6.md").write_text(t + "\n")
print(t)
PY
date -u +%FT%TZ > /tmp/p/b6.end
