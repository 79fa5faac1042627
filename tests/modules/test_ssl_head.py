"""SSLHeadModule: frozen eval classifier (bit-identical after fit), head export, adv_set metrics
(the callbacks the module adds)."""

from __future__ import annotations

import logging
import math

import pytest
import pytorch_lightning as pl
import torch

from revlit.callbacks.export import ExportHead
from revlit.callbacks.ssl_adv import ADV_SEED_OFFSET, AdvSSLLoss
from revlit.data.datamodule import CIFAR10DataModule
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import load_classifier, sha256_file
from revlit.modules.ssl_head import SSLHeadModule
from revlit.ssl import SimCLRViews, SSLHead, load_head, mean_ssl_loss


def _dm(root, **kw) -> CIFAR10DataModule:
    kw.setdefault("val_size", 20)
    kw.setdefault("batch_size", 8)
    kw.setdefault("eval_batch_size", 10)
    return CIFAR10DataModule(data_dir=str(root), augment=False, **kw)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 1)
    kw.setdefault("limit_train_batches", 2)  # two training steps, then one validation
    kw.setdefault("limit_val_batches", 1)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


def test_fit_keeps_classifier_bit_identical_and_exports_head(
    tiny_cifar_dir, tiny_classifier_ckpt, tmp_path
):
    module = SSLHeadModule(
        str(tiny_classifier_ckpt),
        views=SimCLRViews(mode="per_sample"),
        lr=1e-2,
        export_path=str(tmp_path / "head.pt"),
    )
    before = {k: v.clone() for k, v in module.classifier.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    assert any("running_mean" in k for k in before) and any(
        "num_batches_tracked" in k for k in before
    )
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.classifier.training, pl_module.head.training))

    # Lightning 2.6 leaves the module's mode alone at fit start, older versions and user code call
    # model.train(): do it here so the test covers that path.
    module.train()
    _trainer(tmp_path, callbacks=[Spy()]).fit(module, datamodule=_dm(tiny_cifar_dir))
    assert modes == [(False, True), (False, True)]  # classifier eval, head trains
    after = module.classifier.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"classifier {k} changed"
    assert all(not p.requires_grad for p in module.classifier.parameters())
    # the head did train
    assert any(not torch.equal(v, module.head.state_dict()[k]) for k, v in head_before.items())
    # exported head is tied to the classifier's sha256 and refused on another one
    sha = sha256_file(tiny_classifier_ckpt)
    head, info = load_head(tmp_path / "head.pt", classifier_sha256=sha)
    assert info["meta"]["n_views"] == 2 and info["meta"]["loss"] == "nt_xent"
    with pytest.raises(ValueError, match="trained on classifier"):
        load_head(tmp_path / "head.pt", classifier_sha256="0" * 64)
    # the classifier in the checkpoint file is also unchanged (the module loaded a copy)
    clf, _ = load_classifier(tiny_classifier_ckpt)
    for k, v in clf.state_dict().items():
        assert torch.equal(v, after[k])


def test_export_keeps_the_head_of_the_best_val_loss(tiny_cifar_dir, tiny_classifier_ckpt, tmp_path):
    torch.manual_seed(0)
    module = SSLHeadModule(str(tiny_classifier_ckpt), lr=1.0, export_path=str(tmp_path / "h.pt"))
    assert [type(c) for c in module.configure_callbacks()] == [ExportHead]
    assert SSLHeadModule(str(tiny_classifier_ckpt)).configure_callbacks() == []
    seen = []

    class Spy(pl.Callback):  # runs before the module's callbacks
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                state = {k: v.clone() for k, v in pl_module.head.state_dict().items()}
                seen.append((float(trainer.callback_metrics["val/loss"]), state))

    trainer = _trainer(tmp_path, max_epochs=4, limit_val_batches=2, callbacks=[Spy()])
    trainer.fit(module, datamodule=_dm(tiny_cifar_dir))
    losses = [v for v, _ in seen]
    best = losses.index(min(losses))
    assert len(seen) == 4 and best < 3  # a later epoch was worse: best is not last
    ckpt = torch.load(tmp_path / "h.pt", weights_only=True)
    assert ckpt["meta"]["epoch"] == best and ckpt["meta"]["val_loss"] == pytest.approx(min(losses))
    assert ckpt["meta"]["val_chance"] == pytest.approx(math.log(10 * 2 - 1))
    for k, v in seen[best][1].items():
        assert torch.equal(ckpt["state_dict"][k], v), k


def test_train_cannot_flip_the_classifier(tiny_classifier_ckpt):
    module = SSLHeadModule(str(tiny_classifier_ckpt))
    module.train()
    assert module.head.training and not module.classifier.training
    assert not any(m.training for m in module.classifier.modules())
    module.eval()
    assert not module.head.training


def test_val_loss_logged_and_lower_than_chance_after_training(
    tiny_cifar_dir, tiny_classifier_ckpt, tmp_path
):
    # Gentle views make the task learnable in a few steps on tiny data.
    views = SimCLRViews(scale=(0.6, 1.0), jitter_p=0.0, gray_p=0.0)
    module = SSLHeadModule(
        str(tiny_classifier_ckpt), views=views, lr=1e-2, loss=ContrastiveLoss("nt_xent")
    )
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=2)
    trainer.fit(module, datamodule=_dm(tiny_cifar_dir, batch_size=16))
    m = trainer.callback_metrics
    assert m["val/chance"].item() == pytest.approx(torch.log(torch.tensor(10 * 2 - 1.0)).item())
    assert m["val/loss"].item() < m["val/chance"].item()
    assert "train/loss" in m and "train/epoch_seconds" in m


def test_adv_set_metrics_and_mismatch_refusal(
    tiny_cifar_dir, tiny_classifier_ckpt, tmp_path, caplog
):
    from revlit.data.cifar import load_cifar10
    from revlit.data.stored import save_stored_set

    x, y = load_cifar10(str(tiny_cifar_dir), train=False, check_md5=False)
    idx = torch.arange(12)
    clean = x[:12].float() / 255
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) - 0.5
    adv = (clean + 16 / 255 * noise.sign()).clamp(0, 1)
    sha = sha256_file(tiny_classifier_ckpt)
    save_stored_set(tmp_path / "pgd" / "tinyset", adv, y[:12], idx, {"classifier_sha256": sha})
    module = SSLHeadModule(
        str(tiny_classifier_ckpt),
        adv_set="tinyset",
        pgd_root=str(tmp_path / "pgd"),
        adv_k=12,
        adv_batch_size=6,
    )
    trainer = _trainer(tmp_path, limit_train_batches=1)
    trainer.fit(module, datamodule=_dm(tiny_cifar_dir))
    m = trainer.callback_metrics
    assert {"val/ssl_clean", "val/ssl_adv", "val/ssl_adv_minus_clean"} <= set(m)
    (cb,) = [c for c in module.configure_callbacks() if isinstance(c, AdvSSLLoss)]
    c, a = cb.losses(module.eval())  # as in validation: head and classifier in eval mode
    assert (m["val/ssl_clean"].item(), m["val/ssl_adv"].item()) == pytest.approx((c, a))
    assert c != a  # the attacked images give a different loss
    assert cb.losses(module) == (c, a)  # same batches, same view seeds: reproducible
    # clean half of the comparison really is the clean test images at those indices
    assert torch.equal(cb.images[0], clean) and torch.equal(cb.images[1], adv)
    # the comparison is the framework-free mean over batches of 6 with seeds offset per batch
    seed = module.views_seed + ADV_SEED_OFFSET
    parts = (module.classifier, module.head, module.views, module.loss)
    assert mean_ssl_loss(*parts, clean, 2, 6, seed) == pytest.approx(c)
    assert mean_ssl_loss(*parts, clean, 2, 6, seed + 1) != pytest.approx(c)

    save_stored_set(tmp_path / "pgd" / "other", adv, y[:12], idx, {"classifier_sha256": "f" * 64})
    other = SSLHeadModule(
        str(tiny_classifier_ckpt), adv_set="other", pgd_root=str(tmp_path / "pgd")
    )
    with pytest.raises(ValueError, match="made against classifier ffffffffffff"):
        _trainer(tmp_path, limit_train_batches=1).fit(other, datamodule=_dm(tiny_cifar_dir))
    allowed = SSLHeadModule(
        str(tiny_classifier_ckpt),
        adv_set="other",
        pgd_root=str(tmp_path / "pgd"),
        allow_mismatch=True,
    )
    with caplog.at_level(logging.WARNING, logger="revlit"):
        _trainer(tmp_path, limit_train_batches=1).fit(allowed, datamodule=_dm(tiny_cifar_dir))
    assert any("allow_mismatch" in r.getMessage() for r in caplog.records)


def test_bad_arguments(tiny_classifier_ckpt):
    with pytest.raises(ValueError, match="n_views"):
        SSLHeadModule(str(tiny_classifier_ckpt), n_views=1)
    with pytest.raises(ValueError, match="feature_dim"):
        SSLHeadModule(str(tiny_classifier_ckpt), head=SSLHead(999))
    with pytest.raises(ValueError, match="not found"):
        SSLHeadModule("no/such/classifier.pt")
