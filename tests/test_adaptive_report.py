"""The adaptive evaluation's statistics on hand-made outputs: intervals, rows, worst case, paired
difference, convergence, which attack breaks which image, plots."""

from __future__ import annotations

import pytest
import torch

from revlit.adaptive_report import (
    REFERENCE,
    WORST,
    break_confusion,
    convergence_check,
    paired_difference,
    plot_convergence,
    row_names,
    summarize_table,
    verdict,
    wilson_interval,
)


def fake_row(correct: torch.Tensor, static=None, broken=None) -> dict[str, torch.Tensor]:
    n, r = correct.shape
    return {
        "attacked": torch.ones(n, dtype=torch.bool),
        "static": torch.ones(n, dtype=torch.bool) if static is None else static,
        "draws": correct,
        "ce": torch.zeros(n, r),
        "broken_iter": torch.zeros(n, dtype=torch.bool) if broken is None else broken,
        "passes": torch.full((n,), 10.0, dtype=torch.float64),
        "seconds": torch.full((n,), 0.5, dtype=torch.float64),
    }


def merged_of(prefix: str = "", **rows) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    robust = None
    for name, fields in rows.items():
        out.update({f"{prefix}{name}.{k}": v for k, v in fields.items()})
        ok = fields["draws"].all(1) & ~fields["broken_iter"]
        robust = ok if robust is None else robust & ok
    out[f"{prefix}final.robust"] = robust
    return out


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and 0.25 < hi < 0.35  # 0.2775
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(500, 500)
    assert hi == 1.0 and 0.99 < lo < 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_the_worst_case_row_takes_each_image_at_its_weakest_and_the_verdict_uses_it():
    n = 200
    a = torch.ones(n, 3, dtype=torch.bool)
    a[:50] = False
    b = torch.ones(n, 3, dtype=torch.bool)
    b[40:100, 1] = False  # broken in one draw only
    static = torch.zeros(n, dtype=torch.bool)
    static[:90] = True  # static APGD keeps 45 %
    m = merged_of(**{REFERENCE: fake_row(a, static=static), "bpda_apgd_ce": fake_row(b)})
    assert row_names(m) == [REFERENCE, "bpda_apgd_ce"]
    rows = {s.name: s for s in summarize_table(m)}
    assert rows[REFERENCE].worst == pytest.approx(0.75)
    assert rows["bpda_apgd_ce"].worst == pytest.approx(0.70)
    assert rows["bpda_apgd_ce"].mean == pytest.approx(1 - 60 / 600)
    assert rows[WORST].worst == pytest.approx(0.50)  # broken by one row or the other: 0..99
    assert rows[WORST].mean <= min(rows[REFERENCE].mean, rows["bpda_apgd_ce"].mean)
    assert rows[WORST].passes_per_image == pytest.approx(20.0)
    text = verdict(list(rows.values()))
    assert "50.0 %" in text and "45.0 %" in text and "count on" in text


def test_the_paired_difference_counts_discordant_images_and_drives_the_verdict():
    n = 400
    static = torch.zeros(n, dtype=torch.bool)
    static[:160] = True  # static APGD keeps 40 %
    same = torch.zeros(n, 2, dtype=torch.bool)
    same[:160] = True  # the defended worst case: exactly the same images
    p = paired_difference(merged_of(**{REFERENCE: fake_row(same, static=static)}))
    assert p["difference"] == 0 and p["only_defended"] == p["only_static"] == 0
    assert p["ci"] == [0.0, 0.0]
    better = same.clone()
    better[160:200] = True  # 40 more images survive only with the defense: +10 points
    better[:8] = False  # 8 survive only without it: -2 points
    m2 = merged_of(**{REFERENCE: fake_row(better, static=static)})
    p2 = paired_difference(m2)
    assert p2["only_defended"] == 40 and p2["only_static"] == 8
    assert p2["difference"] == pytest.approx(32 / n)
    assert 0 < p2["ci"][0] < 32 / n < p2["ci"][1]
    text = verdict(summarize_table(m2), paired=p2)
    assert "+8.0 points" in text and "excludes 0" in text
    assert paired_difference(merged_of(bpda_pgd=fake_row(same))) is None  # no static reference


def test_convergence_flags_a_move_of_one_point_or_more(tmp_path):
    base = torch.ones(100, 2, dtype=torch.bool)
    base[:40] = False  # worst case 0.60
    moved = base.clone()
    moved[40:42] = False  # two more images broken: 0.58
    m = merged_of(bpda_apgd_ce=fake_row(base))
    assert convergence_check(m) is None  # no variants run
    for what in ("iterations", "eot", "restarts"):
        m.update(merged_of(f"conv_{what}/", bpda_apgd_ce=fake_row(base)))
    partial = convergence_check(m)
    assert partial["converged"] is None and partial["variants"]["draws"] is None
    m.update(merged_of("conv_draws/", bpda_apgd_ce=fake_row(base)))
    ok = convergence_check(m)
    assert ok["converged"] is True and ok["variants"]["iterations"]["delta"] == 0
    m.update(merged_of("conv_eot/", bpda_apgd_ce=fake_row(moved)))
    bad = convergence_check(m)
    assert bad["converged"] is False
    assert bad["variants"]["eot"]["delta"] == pytest.approx(-0.02)
    assert bad["variants"]["eot"]["examples_changed"] == 2
    png = plot_convergence(bad, tmp_path / "convergence.png")
    assert png.stat().st_size > 5000


def test_which_attack_breaks_which_image():
    n = 10
    t = torch.ones(n, 1, dtype=torch.bool)
    t[:3] = False  # transfer breaks 0, 1, 2
    a = torch.ones(n, 1, dtype=torch.bool)
    a[2:6] = False  # adaptive breaks 2, 3, 4, 5
    m = merged_of(transfer_pgd=fake_row(t), bpda_apgd_ce=fake_row(a))
    c = break_confusion(m)
    assert c == {"n": 10, "transfer_only": 2, "adaptive_only": 3, "both": 1, "neither": 4}
    m["bpda_apgd_ce.attacked"][0] = False  # with the cascade the question has no answer
    assert break_confusion(m) is None
