"""DefenseModule: predict/test in one process and under 2-process DDP, refusals, records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from revlit.callbacks.defense_viz import DefenseViz
from revlit.callbacks.defense_writer import DefenseWriter
from revlit.data.cifar import load_cifar10
from revlit.data.datamodule import CIFAR10DataModule
from revlit.data.stored import save_stored_set
from revlit.defenses import NoDefense, RandomNoise, ReversePurifier
from revlit.defenses.evaluate import single_image_batches
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import sha256_file
from revlit.modules.defense import DefenseModule
from revlit.records import FIELDS, load_record
from revlit.ssl import SimCLRViews, SSLHead, save_head

REPO = Path(__file__).resolve().parents[2]
FAST = {"viz_images": 4}


def short(**kw) -> ReversePurifier:
    """A short reverse attack (2 steps, 2 views) for tiny tests."""
    return ReversePurifier(**{"steps": 2, "n_views": 2, **kw})


def write_head(path: Path, classifier: Path, meta: dict | None = None, seed: int = 0) -> Path:
    """A tiny SSL head (64 -> 32 -> 8) for the tiny classifier, with non-trivial BN statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = SSLHead(64, 32, 8)
        with torch.no_grad():
            head.train()(torch.randn(64, 64))
    meta = {"loss": "nt_xent", "temperature": 0.2} if meta is None else meta
    save_head(head.eval(), path, sha256_file(classifier), meta=meta)
    return path


@pytest.fixture
def ckpts(tmp_path, tiny_classifier_ckpt):
    return tiny_classifier_ckpt, write_head(tmp_path / "head.pt", tiny_classifier_ckpt)


def trainer(tmp_path: Path, out: str | None = None, **kw) -> pl.Trainer:
    cbs = [DefenseWriter(str(tmp_path / out)), DefenseViz()] if out else []
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=cbs,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=kw.pop("inference_mode", False),
        **kw,
    )


def datamodule(data_dir, eval_set="clean", n=16, bs=8, **kw) -> CIFAR10DataModule:
    return CIFAR10DataModule(
        data_dir=str(data_dir), eval_set=eval_set, test_subset=n, eval_batch_size=bs, **kw
    )


def test_predict_writes_sorted_predictions_records_and_pictures(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    module = DefenseModule(str(clf), str(head), defense=short(), **FAST)
    trainer(tmp_path, "run").predict(module, datamodule=datamodule(tiny_cifar_dir, bs=8))
    out = tmp_path / "run"
    pred = torch.load(out / "predictions.pt", weights_only=True)
    assert torch.equal(pred["index"], torch.arange(16))
    _, labels = load_cifar10(tiny_cifar_dir, train=False)
    assert torch.equal(pred["label"], labels[:16])
    assert pred["ssl_steps"].shape == (16, 3)
    assert (pred["delta_linf"] <= 16 / 255 + 1e-6).all() and (pred["delta_linf"] > 0).all()
    for name in ("predictions.csv", "defense_grid.png", "ssl_hist.png", "records.jsonl"):
        assert (out / name).stat().st_size > 0, name
    none, rev = load_record(out / "record_none.json"), load_record(out / "record_reverse.json")
    assert set(FIELDS) <= set(rev)
    assert none["accuracy"] == pytest.approx(float((pred["pred"] == pred["label"]).float().mean()))
    assert rev["accuracy"] == pytest.approx(
        float((pred["pred_def"] == pred["label"]).float().mean())
    )
    assert rev["loss"] == pytest.approx(float(pred["loss_def"].double().mean()))
    assert rev["ssl_loss_after"] == pytest.approx(float(pred["ssl_after"].double().mean()))
    assert not torch.equal(pred["ssl_after"], pred["ssl_before"])
    assert rev["defense"]["steps"] == 2 and rev["defense"]["batch_size"] == 8
    assert rev["passes_per_image"] == (3 * 2 + 2 * 2) + 1
    assert rev["head"]["sha256"] == sha256_file(head)
    assert none["defense"]["method"] == "none" and none["ssl_loss_after"] == none["ssl_loss_before"]


def test_test_metrics_match_predict_for_the_same_batches(tmp_path, tiny_cifar_dir, ckpts):
    """Same batches and seed -> same numbers, whether via predict or test (metrics)."""
    clf, head = ckpts
    m1 = DefenseModule(str(clf), str(head), defense=RandomNoise(), **FAST)
    trainer(tmp_path, "p").predict(m1, datamodule=datamodule(tiny_cifar_dir, bs=8))
    pred = torch.load(tmp_path / "p" / "predictions.pt", weights_only=True)
    m2 = DefenseModule(str(clf), str(head), defense=RandomNoise(), **FAST)
    (metrics,) = trainer(tmp_path).test(m2, datamodule=datamodule(tiny_cifar_dir, bs=8))
    label = pred["label"]
    assert metrics["test/acc"] == pytest.approx(float((pred["pred"] == label).float().mean()))
    assert metrics["test/acc_noise"] == pytest.approx(
        float((pred["pred_def"] == label).float().mean())
    )
    assert metrics["test/loss_noise"] == pytest.approx(float(pred["loss_def"].mean()), rel=1e-5)
    assert metrics["test/ssl_after_noise"] == pytest.approx(
        float(pred["ssl_after"].mean()), rel=1e-5
    )


def test_ssl_before_and_after_are_paired(tmp_path, tiny_cifar_dir, ckpts):
    """Same views before and after: a defense that changes nothing gives exactly the same loss."""
    clf, head = ckpts
    module = DefenseModule(str(clf), str(head), defense=RandomNoise(eps=0.0), **FAST)
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    out = module.defend_batch(x[:8].float() / 255, y[:8], torch.arange(8))
    assert torch.equal(out["ssl_after"], out["ssl_before"])
    noisy = DefenseModule(str(clf), str(head), defense=RandomNoise(eps="16/255"), **FAST)
    out2 = noisy.defend_batch(x[:8].float() / 255, y[:8], torch.arange(8))
    assert torch.equal(out2["ssl_before"], out["ssl_before"])
    assert not torch.equal(out2["ssl_after"], out2["ssl_before"])


def test_predict_refuses_inference_mode(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    module = DefenseModule(str(clf), str(head), defense=short(), **FAST)
    t = trainer(tmp_path, "x", inference_mode=True)
    with pytest.raises(ValueError, match="inference_mode false") as e:
        t.predict(module, datamodule=datamodule(tiny_cifar_dir))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x" / "predictions.pt").exists()


def test_cli_turns_inference_mode_into_one_line(tmp_path, tiny_cifar_dir, ckpts, capsys):
    from revlit.cli import main

    clf, head = ckpts
    args = [
        "predict",
        "--model=revlit.modules.defense.DefenseModule",
        f"--model.classifier={clf}",
        f"--model.head={head}",
        "--data=revlit.data.datamodule.CIFAR10DataModule",
        f"--data.data_dir={tiny_cifar_dir}",
        "--data.test_subset=8",
        "--trainer.inference_mode=true",
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as e:
            main(args)
    finally:
        os.chdir(cwd)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("revlit: error:")]
    assert len(err) == 1 and "inference_mode" in err[0]


@pytest.mark.parametrize("corrupt", ["nan", "range"])
def test_refuses_nan_and_out_of_range_inputs(tmp_path, tiny_cifar_dir, ckpts, corrupt):
    clf, head = ckpts
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    x = x[:8].float() / 255
    if corrupt == "nan":
        x[3, 0, 5, 5] = float("nan")
    else:
        x[2] = x[2] * 1.5 + 0.01
    save_stored_set(
        tmp_path / "bad", x, y[:8], torch.arange(8), {"classifier_sha256": sha256_file(clf)}
    )
    module = DefenseModule(str(clf), str(head), defense=short(), **FAST)
    with pytest.raises(ValueError, match="NaN" if corrupt == "nan" else r"\[0, 1\]") as e:
        trainer(tmp_path, "bad_out").predict(
            module, datamodule=datamodule(tiny_cifar_dir, str(tmp_path / "bad"), n=8)
        )
    assert "\n" not in str(e.value)


def test_refuses_other_classifiers_sets_and_heads(tmp_path, tiny_cifar_dir, ckpts):
    from tests.helpers import write_tiny_classifier

    clf, head = ckpts
    other = write_tiny_classifier(tmp_path / "other.pt", seed=5)
    with pytest.raises(ValueError, match="trained on classifier"):
        DefenseModule(str(other), str(head), defense=short(), **FAST)
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    save_stored_set(
        tmp_path / "s",
        x[:8].float() / 255,
        y[:8],
        torch.arange(8),
        {"classifier_sha256": "ab" * 32},
    )
    module = DefenseModule(str(clf), str(head), defense=short(), **FAST)
    with pytest.raises(ValueError, match="allow_mismatch"):
        trainer(tmp_path, "o").predict(
            module, datamodule=datamodule(tiny_cifar_dir, str(tmp_path / "s"), n=8)
        )


def test_single_image_batches_refused(tmp_path, tiny_cifar_dir, ckpts):
    assert single_image_batches(17, 4, 2) == [9] and single_image_batches(16, 4, 2) == []
    clf, head = ckpts
    module = DefenseModule(str(clf), str(head), defense=short(), **FAST)
    with pytest.raises(ValueError, match="batch of 1 image"):
        trainer(tmp_path, "one").predict(module, datamodule=datamodule(tiny_cifar_dir, n=9, bs=4))


def test_loss_and_views_default_to_the_heads_record(tmp_path, tiny_classifier_ckpt, caplog):
    meta = {"loss": "alignment", "temperature": 0.5, "views": repr(SimCLRViews(mode="per_sample"))}
    head = write_head(tmp_path / "h.pt", tiny_classifier_ckpt, meta=meta)
    m = DefenseModule(str(tiny_classifier_ckpt), str(head), defense=short(), **FAST)
    got = m.defense_settings()
    assert (got["loss"], got["temperature"], got["view_mode"]) == ("alignment", 0.5, "per_sample")
    assert (m.defense.loss.name, m.defense.views.mode) == ("alignment", "per_sample")
    assert m.probe.loss is m.defense.loss and m.probe.views is m.defense.views
    own = short(loss=ContrastiveLoss("nt_xent"), views=SimCLRViews(mode="shared"))
    with caplog.at_level("WARNING", logger="revlit"):
        m2 = DefenseModule(str(tiny_classifier_ckpt), str(head), defense=own, **FAST)
    assert (m2.defense_settings()["loss"], m2.defense.views.mode) == ("nt_xent", "shared")
    assert "trained with alignment" in caplog.text


def test_no_defense_and_the_default_defense(tmp_path, tiny_cifar_dir, ckpts):
    clf, head = ckpts
    m = DefenseModule(str(clf), str(head), defense=NoDefense(), **FAST)
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    out = m.defend_batch(x[:8].float() / 255, y[:8], torch.arange(8))
    assert torch.equal(out["pred_def"], out["pred"]) and (out["delta_linf"] == 0).all()
    assert m.passes_per_image() == 1 and m.defense_settings()["method"] == "none"
    assert m.viz["label"].shape == m.viz["pred_def"].shape == (4,)
    default = DefenseModule(str(clf), str(head))
    assert isinstance(default.defense, ReversePurifier)
    assert default.defense.settings()["eps"] == pytest.approx(16 / 255)
    assert default.passes_per_image() == 41 * 4 + 40 * 4 + 1


DDP_CONFIG = """
seed_everything: 0
run_name: ddp_test
model:
  class_path: revlit.modules.defense.DefenseModule
  init_args:
    classifier: {clf}
    head: {head}
    defense:
      class_path: revlit.defenses.ReversePurifier
      init_args:
        steps: 2
        n_views: 2
    seed: 3
data:
  class_path: revlit.data.datamodule.CIFAR10DataModule
  init_args:
    data_dir: {data}
    eval_set: clean
    eval_batch_size: 4
    test_subset: 16
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: revlit.callbacks.defense_writer.DefenseWriter
      init_args:
        output_dir: {out}
"""


def test_ddp_two_processes_match_one_process_for_the_same_batches(tmp_path, tiny_cifar_dir, ckpts):
    """2 ranks x batch 4 == 1 process x batch 4 over the same batches (bit-identical predictions).

    Lightning's predict sampler gives rank r the indices r, r+2, r+4, ... so with 16 images and
    batch 4 the DDP batches are {0,2,4,6} {8,..,14} {1,3,5,7} {9,..,15}. The one-process
    reference reads a stored set holding the same images in the order 0,2,..,14,1,3,..,15, so
    it sees exactly those batches (same composition, same first index, hence the same seed).
    """
    clf, head = ckpts
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(DDP_CONFIG.format(clf=clf, head=head, data=tiny_cifar_dir, out=tmp_path / "ddp"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "predict", "--config", str(cfg)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "predictions.pt", weights_only=True)
    assert torch.equal(ddp["index"], torch.arange(16))  # each index exactly once, in order
    rec = json.loads((tmp_path / "ddp" / "record_reverse.json").read_text())
    assert rec["defense"]["world_size"] == 2 and rec["n"] == 16

    x, y = load_cifar10(tiny_cifar_dir, train=False)
    order = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
    save_stored_set(
        tmp_path / "perm", x[order].float() / 255, y[order], order,
        {"classifier_sha256": sha256_file(clf)},
    )  # fmt: skip
    module = DefenseModule(str(clf), str(head), defense=short(), seed=3)
    dm = datamodule(tiny_cifar_dir, str(tmp_path / "perm"), n=16, bs=4)
    trainer(tmp_path, "one").predict(module, datamodule=dm)
    one = torch.load(tmp_path / "one" / "predictions.pt", weights_only=True)
    assert torch.equal(one["index"], ddp["index"])
    for k in ("label", "pred", "pred_def", "selected_step"):
        assert torch.equal(one[k], ddp[k]), k
    for k in ("loss", "loss_def", "ssl_before", "ssl_after", "ssl_steps", "delta_l2"):
        torch.testing.assert_close(one[k], ddp[k], rtol=1e-5, atol=1e-6, msg=k)
    # and a different batch composition (batch 8 in one process) really changes the numbers
    module8 = DefenseModule(str(clf), str(head), defense=short(), seed=3)
    trainer(tmp_path, "eight").predict(module8, datamodule=datamodule(tiny_cifar_dir, n=16, bs=8))
    eight = torch.load(tmp_path / "eight" / "predictions.pt", weights_only=True)
    assert not torch.allclose(eight["ssl_before"], ddp["ssl_before"])


CONFIGS = sorted((REPO / "configs" / "defense").glob("*.yaml"))


def test_the_eight_configs_parse_and_one_runs(tmp_path, tiny_cifar_dir, ckpts, capsys):
    from revlit.cli import main

    names = {c.stem for c in CONFIGS}
    assert names >= {f"{s}{d}" for s in ("clean", "l_1", "l_2", "l_inf") for d in ("", "_defended")}
    for cfg in CONFIGS:
        with pytest.raises(SystemExit) as e:
            main(["predict", "--config", str(cfg), "--print_config"])
        assert e.value.code in (0, None), cfg
    capsys.readouterr()
    clf, head = ckpts
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    save_stored_set(
        tmp_path / "pgd" / "resnet20_at_l_inf", x[:8].float() / 255, y[:8], torch.arange(8),
        {"name": "resnet20_at_l_inf", "norm": "l_inf", "eps": 8 / 255, "classifier_sha256": sha256_file(clf)},
    )  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        main([
            "predict", "--config", str(REPO / "configs/defense/l_inf_defended.yaml"),
            f"--model.init_args.classifier={clf}", f"--model.init_args.head={head}",
            "--model.init_args.defense.init_args.steps=1",
            "--model.init_args.defense.init_args.n_views=2",
            f"--data.init_args.data_dir={tiny_cifar_dir}", "--data.init_args.pgd_root=pgd",
            "--data.init_args.test_subset=8", "--data.init_args.eval_batch_size=4",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        ])  # fmt: skip
    finally:
        os.chdir(cwd)
    rec = load_record(tmp_path / "results" / "defense_l_inf_defended" / "record_reverse.json")
    assert rec["data"]["split"] == "resnet20_at_l_inf" and rec["attack"]["kind"] == "transfer"
    assert rec["n"] == 8 and rec["defense"]["steps"] == 1
    assert any((tmp_path / "logs" / "defense_l_inf_defended").rglob("events.out.tfevents*"))


def test_writer_overwrite_resume_are_init_arguments_and_it_names_the_final_folder(
    tmp_path, tiny_cifar_dir, ckpts, caplog
):
    import logging

    clf, head = ckpts
    out = tmp_path / "res" / "run"

    def run(**kw) -> None:
        module = DefenseModule(str(clf), str(head), defense=NoDefense(), viz_images=0)
        t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, inference_mode=False,
                       callbacks=[DefenseWriter(str(out), write_csv=False, **kw)])  # fmt: skip
        t.predict(module, datamodule=datamodule(tiny_cifar_dir, n=8, bs=4))

    with caplog.at_level(logging.INFO, logger="revlit"):
        run()
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    assert wrote and wrote[-1].startswith(f"wrote {out} (") and ".partial" not in wrote[-1]
    with pytest.raises(ValueError, match="already exists"):
        run()
    first = (out / "record_none.json").read_text()
    run(resume=True)  # same settings: the finished rows are reused
    assert json.loads((out / "record_none.json").read_text())["n"] == 8
    run(overwrite=True)
    assert (
        json.loads((out / "record_none.json").read_text())["accuracy"]
        == json.loads(first)["accuracy"]
    )
