"""AdaptiveModule: the table on tiny checkpoints, records, plots, refusals, 2-process DDP."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from revlit import adaptive_report as report
from revlit.attacks.cascade import BPDAEOT, DefenseAwarePGD, Transfer
from revlit.callbacks.adaptive_report import AdaptiveReport
from revlit.data.datamodule import CIFAR10DataModule
from revlit.defenses import ReversePurifier
from revlit.io import sha256_file
from revlit.modules.adaptive import AdaptiveModule
from revlit.records import FIELDS, load_record
from revlit.ssl import SSLHead, save_head

REPO = Path(__file__).resolve().parents[2]


def tiny(**kw) -> dict:
    """A tiny budget: 2-step purifier, 1-3 iteration attacks, r = 2."""
    attacks = [Transfer("pgd", 2), Transfer("apgd_ce_dlr", 3), BPDAEOT("apgd_ce", 2, eot=2),
               DefenseAwarePGD(2)]  # fmt: skip
    return {"defense": ReversePurifier(steps=2, n_views=2), "attacks": attacks, "draws": 2, **kw}


def write_head(path: Path, classifier: Path) -> Path:
    """A tiny SSL head (64 -> 16 -> 8) for the tiny classifier, with non-trivial BN statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = SSLHead(64, 16, 8)
        with torch.no_grad():
            head.train()(torch.randn(32, 64))
    save_head(
        head.eval(), path, sha256_file(classifier), meta={"loss": "nt_xent", "temperature": 0.2}
    )
    return path


@pytest.fixture
def ckpts(tmp_path, tiny_classifier_ckpt):
    return tiny_classifier_ckpt, write_head(tmp_path / "head.pt", tiny_classifier_ckpt)


def run_test(module, data_dir, out=None, n=8, bs=4, **trainer_kw):
    dm = CIFAR10DataModule(data_dir=str(data_dir), test_subset=n, eval_batch_size=bs)
    cb = AdaptiveReport(str(out)) if out is not None else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=trainer_kw.pop("inference_mode", False),
        callbacks=[cb] if cb else [], **trainer_kw,
    )  # fmt: skip
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return cb


def test_the_table_records_plots_and_checks(tmp_path, tiny_cifar_dir, ckpts, capsys):
    clf, head = ckpts
    out = tmp_path / "adaptive"
    module = AdaptiveModule(str(clf), str(head), sweep_eps=["0", "64/255"], convergence=True,
                            **tiny())  # fmt: skip
    assert module.attacks[2].purifier(module.target) is module.defense  # BPDA: deployed inside
    run_test(module, tiny_cifar_dir, out)
    printed = capsys.readouterr().out
    order = ["transfer_pgd", "transfer_apgd_ce_dlr", "defense_aware", "bpda_apgd_ce"]
    for row in (*order, report.WORST):
        assert report.LABELS[row] in printed, row

    merged = torch.load(out / "predictions.pt", weights_only=True)
    assert torch.equal(merged["index"], torch.arange(8))
    assert report.row_names(merged) == order  # transfer first, then cheapest first
    assert merged["bpda_apgd_ce.draws"].shape == (8, 2)
    # the cascade: an adaptive attack only attacks what the earlier rows left unbroken
    before = report.row_robust(merged, "defense_aware")
    assert torch.equal(merged["bpda_apgd_ce.attacked"], before)
    assert merged["transfer_apgd_ce_dlr.attacked"].sum() <= merged["transfer_pgd.attacked"].sum()

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {*order, report.WORST}
    for r in rows.values():
        assert 0 <= r["worst"] <= r["mean"] + 1e-12 <= 1 + 1e-12
    worsts = [rows[r]["worst"] for r in order]
    assert worsts == sorted(worsts, reverse=True)  # cumulative: never goes up
    assert rows[report.WORST]["worst"] == pytest.approx(
        float(merged["final.robust"].float().mean())
    )
    spent = sum(rows[r]["passes_per_image"] for r in order)
    assert rows[report.WORST]["passes_per_image"] == pytest.approx(spent)
    # transfer PGD on all 8: (2 + 1) attack passes + r = 2 draws x ((2 + 1) x 2 views + 1)
    assert rows["transfer_pgd"]["passes_per_image"] == pytest.approx(3 + 2 * (3 * 2 + 1))
    assert [p["eps_255"] for p in summary["eps_sweep"]] == pytest.approx([0, 64])
    conv = summary["convergence"]
    assert set(conv["variants"]) == {"iterations", "eot", "restarts", "draws"}
    assert conv["converged"] in (True, False)
    for png in ("eps_sweep.png", "convergence.png"):
        assert (out / png).stat().st_size > 5000
    assert summary["paired_difference"]["n"] == 8 and "count on" in summary["verdict"]

    for row in (*order, report.WORST):
        rec = load_record(out / f"record_{row}.json")  # validates revlit.records' fields
        assert set(FIELDS) <= set(rec) and rec["n"] == 8, row
        assert rec["defense"]["steps"] == 2 and rec["defense"]["draws"] == 2
        assert rec["classifier"]["sha256"] == sha256_file(clf)
        assert rec["accuracy"] == pytest.approx(rows[row]["mean"])
    bpda = load_record(out / "record_bpda_apgd_ce.json")
    assert bpda["attack"]["inner_purifier"] == "deployed" and bpda["attack"]["eot"] == 2
    ref = load_record(out / "record_transfer_apgd_ce_dlr.json")["adaptive"]
    assert ref["static_accuracy"] <= min(
        ref["static_accuracy_apgd_ce"], ref["static_accuracy_apgd_dlr"]
    )
    assert "convergence" in load_record(out / f"record_{report.WORST}.json")["adaptive"]
    assert len((out / "records.jsonl").read_text().splitlines()) == len(order) + 1
    # the table and both plots regenerate from the saved outputs alone
    report.main([str(out / "predictions.pt"), "--plots", str(tmp_path / "again")])
    again = capsys.readouterr().out
    assert (out / "table.md").read_text().split("\n\n", 1)[1].split("\n\n")[0] in again
    for png in ("eps_sweep.png", "convergence.png"):
        assert (tmp_path / "again" / png).stat().st_size > 5000


def test_a_cheaper_inner_purifier_is_an_option_and_the_record_says_so(
    tmp_path, tiny_cifar_dir, ckpts
):
    clf, head = ckpts
    inner = ReversePurifier(steps=1, n_views=2)
    module = AdaptiveModule(str(clf), str(head), **tiny(attacks=[BPDAEOT("pgd", 1, inner=inner)]))
    spec = module.attacks[0]
    assert spec.purifier(module.target) is inner and inner is not module.defense
    assert inner.classifier is module.net and inner.head is module.head  # bound to the same nets
    run_test(module, tiny_cifar_dir, tmp_path / "o")
    rec = load_record(tmp_path / "o" / "record_bpda_pgd.json")
    assert rec["attack"]["inner_purifier"]["steps"] == 1 and rec["defense"]["steps"] == 2
    assert rec["attack"]["iterate_breaks_counted"] is False
    merged = torch.load(tmp_path / "o" / "predictions.pt", weights_only=True)
    assert not merged["bpda_pgd.broken_iter"].any()  # a cheaper purifier's breaks do not count


def test_refusals(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    with pytest.raises(ValueError, match="distinct"):
        AdaptiveModule(str(clf), str(head), attacks=[Transfer("pgd"), Transfer("pgd")])
    with pytest.raises(ValueError, match="draws"):
        AdaptiveModule(str(clf), str(head), draws=0)
    with pytest.raises(ValueError, match="l_1"):
        AdaptiveModule(str(clf), str(head), norm="l_1", eps=12)
    module = AdaptiveModule(str(clf), str(head), **tiny(attacks=[Transfer("pgd", 1)]))
    with pytest.raises(ValueError, match="inference_mode"):
        run_test(module, tiny_cifar_dir, inference_mode=True)
    with pytest.raises(ValueError, match="batch of 1 image"):
        run_test(module, tiny_cifar_dir, n=9, bs=4)


DDP_CONFIG = """
seed_everything: 0
model:
  class_path: revlit.modules.adaptive.AdaptiveModule
  init_args:
    classifier: {clf}
    head: {head}
    defense: {{class_path: revlit.defenses.ReversePurifier, init_args: {{steps: 1, n_views: 2}}}}
    attacks:
      - {{class_path: revlit.attacks.cascade.Transfer, init_args: {{attack: pgd, steps: 2}}}}
      - {{class_path: revlit.attacks.cascade.BPDAEOT, init_args: {{steps: 2, eot: 2}}}}
    draws: 2
data:
  class_path: revlit.data.datamodule.CIFAR10DataModule
  init_args:
    data_dir: {data}
    eval_batch_size: 4
    test_subset: 8
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: revlit.callbacks.adaptive_report.AdaptiveReport
      init_args: {{output_dir: {out}}}
"""


def test_ddp_two_processes_merge_once_by_test_index(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    cfg = tmp_path / "ddp.yaml"
    out = tmp_path / "ddp"
    cfg.write_text(DDP_CONFIG.format(clf=clf, head=head, data=tiny_cifar_dir, out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(cfg)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = torch.load(out / "predictions.pt", weights_only=True)
    assert torch.equal(merged["index"], torch.arange(8))  # both ranks' rows, each once
    rec = load_record(out / "record_bpda_apgd_ce.json")
    assert rec["defense"]["world_size"] == 2 and rec["n"] == 8 and rec["defense"]["steps"] == 1
    assert proc.stdout.count("| BPDA+EOT APGD-CE |") == 1  # one table, printed by rank 0
    assert not (out / ".parts").exists()


CONFIGS = sorted((REPO / "configs" / "adaptive").glob("*.yaml"))


def _check_init_args(spec: dict) -> None:
    """A class_path/init_args node names a real class and only its real arguments."""
    import importlib

    mod, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    params = inspect.signature(cls.__init__).parameters
    args = spec.get("init_args") or {}
    assert set(args) <= set(params), (cls, set(args) - set(params))
    for v in args.values():
        for sub in v if isinstance(v, list) else [v]:
            if isinstance(sub, dict) and "class_path" in sub:
                _check_init_args(sub)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_name_real_arguments(cfg):
    """Every class and init arg of the shipped presets exists (in-process: no CLI start-up)."""
    conf = yaml.safe_load(cfg.read_text())
    assert conf["model"]["class_path"] == "revlit.modules.adaptive.AdaptiveModule"
    _check_init_args(conf["model"])
    for cb in conf["trainer"]["callbacks"]:
        _check_init_args(cb)
    assert conf["data"]["init_args"]["eval_set"] == "clean"
    assert conf["trainer"]["inference_mode"] is False
    text = cfg.read_text().lower()
    assert "issue" not in text and "session" not in text


def test_the_table_preset_is_the_modules_default_budget():
    """configs/adaptive/table.yaml spells out the module's defaults: the two cannot drift apart."""
    import importlib

    from revlit.attacks.cascade import default_attacks

    conf = yaml.safe_load((REPO / "configs" / "adaptive" / "table.yaml").read_text())
    specs = []
    for a in conf["model"]["init_args"]["attacks"]:
        mod, _, name = a["class_path"].rpartition(".")
        specs.append(getattr(importlib.import_module(mod), name)(**a["init_args"]))
    assert [s.settings() for s in specs] == [s.settings() for s in default_attacks()]
    defense = conf["model"]["init_args"]["defense"]["init_args"]
    assert all(getattr(ReversePurifier(), k) == v for k, v in defense.items())
    params = inspect.signature(AdaptiveModule.__init__).parameters
    for key in ("draws", "cascade", "norm"):
        assert conf["model"]["init_args"][key] == params[key].default, key
