"""``make bench`` (benchmarks/bench.py): the record's fields, the fractions' arithmetic, the child RSS."""

import json

import pytest
import torch

from benchmarks import bench


def test_quick_bench_writes_rows_fractions_and_reference(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--no-memory", "--out", str(out)])
    rec = json.loads(out.read_text())
    names = [r["name"] for r in rec["rows"]]
    assert names == [
        "bound@8", "bound@16", "bound lean@8", "bound lean@16", "bound folded@8",
        "bound folded@16", rec["bracket"], "reference K=2 V=2 B=8", "purifier K=2 V=2 B=8 plain",
        "purifier K=2 V=2 B=8 masks", "purifier K=2 V=2 B=8",
        "purifier K=2 V=2 B=8 fold_bn+recompute", "PGD-10 Linf B=8",
    ]  # fmt: skip
    rows = {r["name"]: r for r in rec["rows"]}
    bound = rec["bound_images_per_s"]
    assert bound == max(rows[f"bound@{b}"]["images_per_s_max"] for b in (8, 16))
    folded = rec["bound_folded_images_per_s"]
    assert folded == max(rows[f"bound folded@{b}"]["images_per_s_max"] for b in (8, 16))
    for r in rec["rows"]:
        if r["name"].startswith("bound"):
            assert "fraction_of_bound" not in r
            continue
        ref = folded if "fold_bn" in r["name"] else bound
        ceiling = ref / r["passes_per_image"]
        assert r["fraction_of_bound"] == pytest.approx(r["images_per_s_max"] / ceiling, abs=2e-3)
        plain = bound / r["passes_per_image"]
        assert r["fraction_of_plain_bound"] == pytest.approx(
            r["images_per_s_max"] / plain, abs=2e-3
        )
    lean = rec["bound_lean_images_per_s"]
    assert lean == max(rows[f"bound lean@{b}"]["images_per_s_max"] for b in (8, 16))
    row = rows["purifier K=2 V=2 B=8"]  # the default (lean) path: against both bounds
    assert row["fraction_of_lean_bound"] == pytest.approx(
        row["images_per_s_max"] / (lean / row["passes_per_image"]), abs=2e-3
    )
    assert "fraction_of_lean_bound" not in rows["purifier K=2 V=2 B=8 plain"]
    # a bound repetition repeats its pass up to the smallest workload's work (2 x 2 x 8 = 32)
    assert rec["bound_window_image_passes"] == 32
    assert [rows[f"bound@{b}"]["calls_per_rep"] for b in (8, 16)] == [4, 2]
    assert rows["purifier K=2 V=2 B=8"]["calls_per_rep"] == 1
    single = rec["bound_single_call_images_per_s"]
    assert single == max(rows[f"bound@{b}"]["images_per_s_single_call_max"] for b in (8, 16))
    assert single >= bound  # the fastest single pass is at least the windows' best
    pgd_row = rows["PGD-10 Linf B=8"]
    assert pgd_row["fraction_of_single_call_bound"] == pytest.approx(
        pgd_row["images_per_s_max"] / (single / 10), abs=2e-3
    )
    # paired: against the best bound window of the same repetition (one repetition here)
    best_in_rep = max(
        rows[f"bound@{b}"]["images"] * rows[f"bound@{b}"]["calls_per_rep"]
        / rows[f"bound@{b}"]["seconds_per_rep"][0]
        for b in (8, 16)
    )  # fmt: skip
    pgd_tput = pgd_row["images"] / pgd_row["seconds_per_rep"][0]
    assert pgd_row["fraction_of_bound_paired_median"] == pytest.approx(
        pgd_tput / (best_in_rep / 10), abs=2e-3
    )
    # bracketed: each workload against the two windows of the best bound batch around it
    assert rec["bracket"] in ("bound bracket@8", "bound bracket@16")
    brk = rows[rec["bracket"]]
    workloads = [n for n in names if not n.startswith("bound")]
    assert brk["reps"] == len(workloads) + 1  # one window before the first, one after each
    assert brk["calls_per_rep"] == rows[rec["bracket"].replace(" bracket", "")]["calls_per_rep"]
    t = brk["seconds_per_rep"]
    work = brk["images"] * brk["calls_per_rep"]
    for i, name in enumerate(workloads):
        r = rows[name]
        expect = (r["images"] * r["passes_per_image"] / r["seconds_per_rep"][0]) / (
            2 * work / (t[i] + t[i + 1])
        )
        assert r["fraction_of_bound_bracketed_per_rep"] == [pytest.approx(expect, abs=2e-3)]
        assert r["fraction_of_bound_bracketed_median"] == pytest.approx(expect, abs=2e-3)
        assert len(r["cpu_seconds_per_rep"]) == len(r["steal_share_per_rep"]) == 1
    for key in ("date", "commit", "torch", "threads", "processor", "malloc_env"):
        assert key in rec
    assert "fraction of bound" in (tmp_path / "bench.md").read_text()
    assert "purifier K=2" in capsys.readouterr().out


def test_bracketed_fractions_cancel_a_linear_drift():
    # a machine slowing down linearly: the bound window before takes 1 s, the one after 3 s,
    # the workload between them (same speed as the bound, twice the work) 4 s
    assert bench.bracketed_fractions([4.0], [(1.0, 3.0)], work=20, bracket_work=10) == [
        pytest.approx(1.0)
    ]
    # a steady machine: the workload at half, then a quarter, of the bound's speed
    assert bench.bracketed_fractions([2.0, 8.0], [(1.0, 1.0), (2.0, 2.0)], 10, 10) == [
        pytest.approx(0.5),
        pytest.approx(0.25),
    ]


def test_steal_share_from_proc_stat_ticks():
    assert bench.steal_share((10, 100), (30, 300)) == pytest.approx(0.1)
    assert bench.steal_share(None, (1, 2)) is None
    assert bench.steal_share((5, 100), (5, 100)) is None
    ticks = bench.cpu_ticks()
    assert ticks is None or 0 <= ticks[0] <= ticks[1]


def test_child_peak_rss_is_the_childs_own_not_the_parents():
    import numpy as np

    ballast = np.ones(2**28 // 8)  # 256 MB resident in this (parent) process
    assert ballast.sum() > 0
    mb = bench.child_peak_rss_mb("resnet20", "purifier K=2 V=2 B=8", [8], [(2, 2, 8, "")], 8)
    # a Python process with torch imported and a tiny batch: ru_maxrss would have inherited
    # the parent's resident set at fork (pytest + torch + ballast, far above 1 GB)
    assert 50 < mb < bench.vm_hwm_mb() - 200


def test_table_shows_the_ddp_comparison():
    rec = {
        "model": "resnet20", "processor": "cpu", "torch": "2", "threads": 2, "date": "d",
        "commit": "c", "malloc_env": {}, "rows": [],
        "ddp": {
            "n": 8, "batch_per_process": 4, "steps": 40, "views": 4, "speedup": 0.9, "note": "n",
            "processes_1": {"strategy": "auto", "images_per_s": 2.0, "process_wall_s": 9.0,
                            "accuracy": 0.5},
            "processes_2": {"strategy": "ddp", "images_per_s": 1.8, "process_wall_s": 12.0,
                            "accuracy": 0.5},
        },
    }  # fmt: skip
    table = bench.format_table(rec)
    assert "| 2 | ddp | 1.8 |" in table and "speed-up 0.9x" in table


@pytest.mark.parametrize(
    "argv",
    [["--reps", "0"], ["--device", "tpu"]]
    + ([] if torch.cuda.is_available() else [["--device", "cuda"]]),
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2


def test_ddp_without_cifar_is_refused_before_any_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REVLIT_DATA_DIR", str(tmp_path))  # empty: no CIFAR-10 here
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("timing started"))
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--ddp", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--ddp needs CIFAR-10" in err and str(tmp_path) in err
    assert not out.exists()


def test_a_failed_ddp_run_keeps_the_timed_rows(tmp_path, monkeypatch, capsys):
    import subprocess

    def failing_run(cmd, **kw):
        raise subprocess.CalledProcessError(2, cmd, "", "Traceback ...\nrevlit: error: no data\n")

    monkeypatch.setattr(bench.subprocess, "run", failing_run)
    ddp = bench.ddp_predict(8, 4)
    assert ddp["error"] == "1 process(es), auto: exit 2: revlit: error: no data"
    rows = [{"name": "stands for the timed rows"}]
    monkeypatch.setattr(bench, "ddp_problem", lambda: None)
    monkeypatch.setattr(
        bench, "run_bench", lambda *a, **k: {"model": "m", "processor": "p", "torch": "t",
                                             "threads": 2, "date": "d", "commit": "c",
                                             "malloc_env": {}, "rows": rows, "ddp": ddp},
    )  # fmt: skip
    table = bench.format_table
    monkeypatch.setattr(bench, "format_table", lambda rec: table({**rec, "rows": []}))
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--ddp", "--out", str(out)])
    assert e.value.code == 1
    assert json.loads(out.read_text())["rows"] == rows  # written before the non-zero exit
    assert (
        "FAILED (1 process(es), auto: exit 2: revlit: error: no data)"
        in out.with_suffix(".md").read_text()
    )
    assert "the DDP comparison failed" in capsys.readouterr().err


def test_bf16_rows_have_fractions_against_both_bounds(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--bf16", "--no-memory", "--no-reference", "--out", str(out)])
    rec = json.loads(out.read_text())
    rows = {r["name"]: r for r in rec["rows"]}
    for name in (
        "bound bf16@8",
        "bound bf16@16",
        "purifier K=2 V=2 B=8 bf16",
        "PGD-10 Linf B=8 bf16",
    ):
        assert name in rows
    b16 = rec["bf16"]
    assert b16["bound_images_per_s"] == max(
        rows[f"bound bf16@{b}"]["images_per_s_max"] for b in (8, 16)
    )
    assert rows[b16["bracket"]]["images"] == b16["bound_batch"]
    # the bf16 bracket runs once before the first workload and once after each
    workloads = [r for r in rec["rows"] if not r["name"].startswith("bound")]
    assert rows[b16["bracket"]]["reps"] == len(workloads) + 1
    t = rows[b16["bracket"]]["seconds_per_rep"]
    work = rows[b16["bracket"]]["images"] * rows[b16["bracket"]]["calls_per_rep"]
    for i, r in enumerate(workloads):  # FP32 and bf16 rows alike get both fractions
        ceiling16 = b16["bound_images_per_s"] / r["passes_per_image"]
        assert r["fraction_of_bf16_bound"] == pytest.approx(
            r["images_per_s_max"] / ceiling16, abs=2e-3
        )
        ceiling = rec["bound_images_per_s"] / r["passes_per_image"]
        if "fold_bn" not in r["name"]:
            assert r["fraction_of_bound"] == pytest.approx(
                r["images_per_s_max"] / ceiling, abs=2e-3
            )
        expect = (r["images"] * r["passes_per_image"] / r["seconds_per_rep"][0]) / (
            2 * work / (t[i] + t[i + 1])
        )
        assert r["fraction_of_bf16_bound_bracketed_per_rep"] == [pytest.approx(expect, abs=2e-3)]
    table = (tmp_path / "bench.md").read_text()
    assert "of the bf16 bound" in table and "| purifier K=2 V=2 B=8 bf16 |" in table


def test_bf16_work_runs_under_autocast_and_fp32_does_not():
    model = bench._frozen(bench.build("resnet20"))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.rand(2, 3, 32, 32)
    g32 = bench.input_grad_pass(model, x)
    g16 = bench.input_grad_pass(model, x, bf16=True)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert g32.dtype == g16.dtype == torch.float32  # the gradient w.r.t. the FP32 input
    # the purifier rows: the "bf16" option runs the backbone in bfloat16, the others in float32
    _, purifiers, attacks = bench.build_variants(
        model, [8], [(1, 2, 4, ""), (1, 2, 4, "bf16")], 4, reference=False, bf16=True
    )
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for v in purifiers + attacks:
        seen.clear()
        v.fn()
        assert set(seen) == {torch.bfloat16 if "bf16" in v.name else torch.float32}, v.name
    hook.remove()
    assert [v.name for v in attacks] == ["PGD-10 Linf B=4", "PGD-10 Linf B=4 bf16"]
