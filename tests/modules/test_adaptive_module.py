"""AdaptiveModule: the whole table on tiny checkpoints, records, plot, refusals, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from revlit import adaptive_report as report
from revlit.data.datamodule import CIFAR10DataModule
from revlit.models.checkpoint import sha256_file
from revlit.modules.adaptive import ALL_ROWS, AdaptiveModule
from revlit.records import FIELDS, load_record
from revlit.ssl import SSLHead, save_head

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "transfer_pgd_steps": 2,
    "static_apgd_steps": 3,
    "steps": 2,
    "eot": 2,
    "draws": 2,
    "purifier_steps": 2,
    "purifier_views": 2,
    "attack_purifier_steps": 1,
    "attack_purifier_views": 2,
    "sweep_eps": ["0", "64/255"],
    "sweep_steps": 2,
}
ADAPTIVE_KEYS = (
    "static_accuracy",
    "static_accuracy_ci95",
    "defended_accuracy_mean",
    "defended_accuracy_worst_case",
    "defended_worst_case_ci95",
    "draws",
    "eot",
    "deployed_purifier",
    "attack_purifier",
    "attack_purifier_is_deployed",
)


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


def run_test(module, data_dir, n=8, bs=4, **trainer_kw):
    dm = CIFAR10DataModule(data_dir=str(data_dir), test_subset=n, eval_batch_size=bs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=trainer_kw.pop("inference_mode", False),
        **trainer_kw,
    )  # fmt: skip
    trainer.test(module, datamodule=dm)
    return trainer


def test_the_table_records_plot_and_checks(tmp_path, tiny_cifar_dir, ckpts, capsys):
    clf, head = ckpts
    out = tmp_path / "adaptive"
    module = AdaptiveModule(str(clf), str(head), output_dir=str(out), **TINY)
    assert not module.attack_is_deployed
    run_test(module, tiny_cifar_dir)
    printed = capsys.readouterr().out
    for row in (*report.ROWS, report.WORST):
        assert report.LABELS[row] in printed, row

    merged = torch.load(out / "outputs.pt", weights_only=True)
    assert torch.equal(merged["index"], torch.arange(8))
    assert merged["bpda_apgd_ce.draws"].shape == (8, 2)
    # the attack purifier is not the deployed one: iterate breaks are not counted
    assert not merged["bpda_apgd_ce.broken_iter"].any()

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == set(ALL_ROWS) | {report.WORST}
    for r in rows.values():
        assert 0 <= r["worst"] <= r["mean"] + 1e-12 <= 1 + 1e-12
        assert r["passes_per_image"] > 0
    worst = rows[report.WORST]
    assert worst["worst"] <= min(rows[r]["worst"] for r in report.ROWS) + 1e-12
    assert worst["passes_per_image"] == pytest.approx(
        sum(rows[r]["passes_per_image"] for r in report.ROWS)
    )
    # passes: the transfer PGD row spends (2 + 1) attack passes + r draws x (3 x 2 views + 1)
    assert rows["transfer_pgd"]["passes_per_image"] == pytest.approx(3 + 2 * (3 * 2 + 1))
    assert [p["eps_255"] for p in summary["eps_sweep"]] == pytest.approx([0, 64])
    assert (out / "eps_sweep.png").stat().st_size > 1000
    conv = summary["convergence"]
    assert set(conv["variants"]) == {"iterations", "eot_samples", "restarts"}
    assert conv["converged"] in (True, False)
    assert "count on" in summary["verdict"]

    for row in (*ALL_ROWS, report.WORST):
        rec = load_record(out / f"record_{row}.json")  # validates revlit.records' fields
        assert set(FIELDS) <= set(rec), row
        assert all(k in rec["adaptive"] for k in ADAPTIVE_KEYS), row
        assert (
            rec["n"] == 8
            and rec["defense"]["steps"] == 2
            and rec["adaptive"]["attack_purifier"]["steps"] == 1
        )
        assert rec["classifier"]["sha256"] == sha256_file(clf)
        assert rec["accuracy"] == pytest.approx(rows[row]["mean"])
    assert load_record(out / "record_transfer_pgd.json")["attack"]["kind"] == "transfer"
    bpda = load_record(out / "record_bpda_apgd_dlr.json")
    assert bpda["attack"]["kind"] == "adaptive" and bpda["attack"]["loss"] == "dlr"
    assert bpda["attack"]["iterate_breaks_counted"] is False
    assert "convergence" in load_record(out / "record_bpda_apgd_ce.json")["adaptive"]
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(ALL_ROWS) + 1


def test_deployed_attack_purifier_counts_iterate_breaks(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    kw = {**TINY, "attack_purifier_steps": None, "attack_purifier_views": None, "sweep_eps": []}
    module = AdaptiveModule(str(clf), str(head), rows=["bpda_pgd"], convergence=False,
                            output_dir=str(tmp_path / "o"), **kw)  # fmt: skip
    assert module.attack_is_deployed and module.attack_purifier is module.purifier
    run_test(module, tiny_cifar_dir)
    rec = load_record(tmp_path / "o" / "record_bpda_pgd.json")
    assert rec["attack"]["iterate_breaks_counted"] is True
    assert (
        rec["adaptive"]["defended_accuracy_worst_case"] <= rec["adaptive"]["defended_accuracy_mean"]
    )


def test_refusals(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    with pytest.raises(ValueError, match="unknown row"):
        AdaptiveModule(str(clf), str(head), rows=["bpda_magic"])
    with pytest.raises(ValueError, match="eot"):
        AdaptiveModule(str(clf), str(head), eot=0)
    with pytest.raises(ValueError, match="l_1"):
        AdaptiveModule(str(clf), str(head), norm="l_1", eps=12)
    module = AdaptiveModule(str(clf), str(head), rows=["transfer_pgd"], sweep_eps=[], **{
        k: v for k, v in TINY.items() if k != "sweep_eps"})  # fmt: skip
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
    rows: [transfer_pgd, bpda_apgd_ce]
    transfer_pgd_steps: 2
    static_apgd_steps: 2
    steps: 2
    eot: 2
    draws: 2
    purifier_steps: 1
    purifier_views: 2
    attack_purifier_steps: 1
    attack_purifier_views: 2
    sweep_eps: []
    convergence: false
    output_dir: {out}
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
"""


def test_ddp_two_processes_merge_once_by_test_index(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    cfg = tmp_path / "ddp.yaml"
    out = tmp_path / "ddp"
    cfg.write_text(DDP_CONFIG.format(clf=clf, head=head, data=tiny_cifar_dir, out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "test", "--config", str(cfg)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = torch.load(out / "outputs.pt", weights_only=True)
    assert torch.equal(merged["index"], torch.arange(8))  # both ranks' rows, each once
    rec = load_record(out / "record_bpda_apgd_ce.json")
    assert rec["defense"]["world_size"] == 2 and rec["n"] == 8
    assert proc.stdout.count("| BPDA+EOT APGD-CE |") == 1  # one table, printed by rank 0
    assert not (out / ".parts").exists()


CONFIGS = sorted((REPO / "configs" / "adaptive").glob("*.yaml"))


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_name_real_arguments(cfg):
    """Every init arg of the shipped presets exists and parses (in-process: no CLI start-up)."""
    import inspect

    import yaml

    from revlit.utils import as_float

    conf = yaml.safe_load(cfg.read_text())
    assert conf["model"]["class_path"] == "revlit.modules.adaptive.AdaptiveModule"
    args = conf["model"]["init_args"]
    params = inspect.signature(AdaptiveModule.__init__).parameters
    assert set(args) <= set(params), set(args) - set(params)
    for e in [args["eps"], args["purifier_eps"], args["purifier_step_size"], *args["sweep_eps"]]:
        assert 0 <= as_float(e) <= 1
    assert args["steps"] >= 1 and args["eot"] >= 1 and args["draws"] >= 1
    assert conf["data"]["init_args"]["eval_set"] == "clean"
    assert conf["trainer"]["inference_mode"] is False
