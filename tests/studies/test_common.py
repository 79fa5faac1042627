"""Study machinery: traced iterates equal short runs, statistics, splits, quick-mode options."""

from __future__ import annotations

import argparse

import pytest
import torch

from revlit.defenses import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.ssl import SimCLRViews, SSLHead
from revlit.studies.common import (
    DefenseConfig,
    Parts,
    Split,
    apply_quick,
    bootstrap_ci,
    defend,
    load_splits,
    purify_traced,
    seed_runs,
)
from tests.helpers import tiny_classifier, tiny_images


def _parts(bank: bool = False) -> Parts:
    clf = tiny_classifier(0)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        head = SSLHead(clf.feature_dim, 16, 8)
        head.train()(torch.randn(32, clf.feature_dim))
    info = {"sha256": "c" * 64, "path": "x.pt"}
    b = torch.randn(40, 8) if bank else None
    return Parts(clf.eval(), info, head.eval(), {"sha256": "h" * 64, "meta": {}}, bank=b)


def _split(n: int = 10) -> Split:
    x, y = tiny_images(n, 3)
    return Split("l_inf", torch.from_numpy(x).float() / 255, torch.from_numpy(y), torch.arange(n))


def test_traced_iterates_equal_independent_short_runs():
    p = _parts()
    x = _split(6).x
    long = ReversePurifier(
        p.classifier, p.head, ContrastiveLoss(), SimCLRViews(), steps=4, n_views=2
    )
    snaps = purify_traced(long, x, torch.Generator().manual_seed(3), [0, 1, 3, 4])
    for k in (1, 3, 4):  # (a 0-step purifier is refused: iterate 0 is only traced)
        short = ReversePurifier(
            p.classifier, p.head, ContrastiveLoss(), SimCLRViews(), steps=k, n_views=2
        )
        ref, _ = short.purify(x, torch.Generator().manual_seed(3))
        assert torch.equal(snaps[k], ref), k
    assert not torch.equal(snaps[1], snaps[4])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        purify_traced(long, x, None, [5])


def test_defend_trace_matches_separate_runs_and_bank_ignores_batch():
    p, sp = _parts(bank=True), _split(10)
    cfg = DefenseConfig(steps=3, n_views=2, batch_size=4)
    traced = defend(p, sp, cfg, trace=[0, 2, 3])
    for k in (2, 3):  # (a 0-step purifier is refused: iterate 0 is only traced)
        single = defend(p, sp, DefenseConfig(steps=k, n_views=2, batch_size=4))
        assert torch.equal(traced.correct_def[k], single.correct_def[k])
    a = defend(p, sp, DefenseConfig(steps=2, n_views=2, batch_size=1, negatives="bank"))
    b = defend(p, sp, DefenseConfig(steps=2, n_views=2, batch_size=7, negatives="bank"))
    assert torch.equal(a.correct_def[2], b.correct_def[2])
    with pytest.raises(ValueError, match="needs a bank"):
        defend(_parts(bank=False), sp, DefenseConfig(steps=1, negatives="bank"))


def test_seed_runs_stack_seeds_and_noise_gains():
    p, sp = _parts(), _split(8)
    runs = seed_runs(p, sp, DefenseConfig(method="noise", eps=0.5), [0, 1, 2])
    assert runs.defended.shape == (3, 8) and len(runs.gains()) == 3
    und = float(runs.correct.double().mean())
    assert runs.gains() == pytest.approx([a - und for a in runs.accuracies()])
    mean, lo, hi = runs.gain_ci(200)
    assert lo <= mean <= hi


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    assert bootstrap_ci(torch.ones(20)) == (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(50, generator=g) < 0.5).double()
    big = (torch.rand(5000, generator=g) < 0.5).double()
    m, lo, hi = bootstrap_ci(small, 1000)
    mb, lob, hib = bootstrap_ci(big, 1000)
    assert lo < m < hi and lob < mb < hib
    assert (hib - lob) < (hi - lo) / 4
    assert abs(mb - 0.5) < 0.03


def test_default_config_refuses_bad_values():
    with pytest.raises(ValueError, match="negatives"):
        DefenseConfig(negatives="queue")
    with pytest.raises(ValueError, match="method"):
        DefenseConfig(method="jpeg")
    assert DefenseConfig().passes() == 160 and DefenseConfig(method="noise").passes() == 0


def test_apply_quick_keeps_explicit_options():
    def add(p):
        p.add_argument("--steps", type=int, default=40)
        p.add_argument("--views", type=int, default=4)

    args = argparse.Namespace(n=None, steps=40, views=3)
    apply_quick(args, {"n": 8, "steps": 2, "views": 2}, add)
    assert (args.n, args.steps, args.views) == (8, 2, 3)


def test_load_splits_aligns_clean_and_refuses_another_classifier(tmp_path, tiny_cifar_dir):
    from revlit.data.stored import save_stored_set

    x = torch.rand(6, 3, 32, 32)
    idx = torch.tensor([3, 5, 7, 9, 11, 13])
    save_stored_set(tmp_path / "clf_l_inf", x, torch.zeros(6, dtype=torch.long), idx,
                    {"classifier_sha256": "a" * 64})  # fmt: skip
    info = {"sha256": "a" * 64, "path": "models/clf.pt"}
    sp = load_splits(["clean", "l_inf"], 4, info, None, tmp_path, str(tiny_cifar_dir))
    assert torch.equal(sp["clean"].idx, idx[:4]) and torch.equal(sp["l_inf"].idx, idx[:4])
    assert list(sp) == ["clean", "l_inf"] and sp["clean"].x.max() <= 1.0
    with pytest.raises(ValueError, match="made against classifier aaaa"):
        load_splits(["l_inf"], 4, {"sha256": "b" * 64, "path": "clf.pt"}, None, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_splits(["l_2"], 4, info, None, tmp_path)


@pytest.mark.parametrize("defense", ["reverse", "noise"])
def test_defend_repeats_defense_module_exactly(tmp_path, tiny_classifier_ckpt, defense):
    # A study row at the default seeding is the number `python -m revlit.evaluate` reports.
    from revlit.models.checkpoint import sha256_file
    from revlit.modules.defense import DefenseModule
    from revlit.ssl.head import save_head
    from revlit.studies.common import load_parts

    clf = tiny_classifier(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        head = SSLHead(clf.feature_dim, 16, 8)
    head_path = tmp_path / "head.pt"
    save_head(head, head_path, sha256_file(tiny_classifier_ckpt), {"loss": "nt_xent"})
    sp = _split(6)
    sp.idx = torch.arange(40, 46)
    from revlit.defenses import RandomNoise, ReversePurifier

    chosen = ReversePurifier(steps=3, n_views=2) if defense == "reverse" else RandomNoise()
    mod = DefenseModule(str(tiny_classifier_ckpt), str(head_path), defense=chosen, seed=5,
                        viz_images=6)  # fmt: skip
    out = mod.defend_batch(sp.x, sp.y, sp.idx)
    parts = load_parts(tiny_classifier_ckpt, head_path, bank=None)
    cfg = DefenseConfig(steps=3, n_views=2, batch_size=6, seed=5, method=defense)
    res = defend(parts, sp, cfg, keep_images=True)
    key = 3 if defense == "reverse" else 0
    assert torch.equal(res.images[key], mod.viz["x_def"])
    assert torch.equal(res.correct_def[key], out["pred_def"] == sp.y)
    other = defend(parts, sp, DefenseConfig(steps=3, n_views=2, batch_size=6, seed=6,
                                            method=defense), keep_images=True)  # fmt: skip
    assert not torch.equal(other.images[key], res.images[key])
