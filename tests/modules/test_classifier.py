"""ClassifierModule with a real pl.Trainer on a tiny synthetic CIFAR-10: a few steps lower the loss."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from revlit.data.cifar import load_cifar10
from revlit.data.datamodule import CIFAR10DataModule
from revlit.models.resnet import CifarResNet
from revlit.modules.classifier import ClassifierModule


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        **kw,
    )


def _train_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Cross-entropy over the whole tiny training set, BN in batch-statistics mode, no updates."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with torch.no_grad():
        loss = F.cross_entropy(net(x), y).item()
    net.load_state_dict(state)  # undo the running-statistics update
    return loss


@pytest.mark.parametrize("adversarial", ["none", "fgsm_rs"])
def test_few_steps_lower_the_loss(tiny_cifar_dir, adversarial):
    pl.seed_everything(0, workers=False)
    dm = CIFAR10DataModule(
        data_dir=str(tiny_cifar_dir), val_size=20, batch_size=20, eval_batch_size=20, augment=False
    )
    net = CifarResNet(depth=8, width=1)
    module = ClassifierModule(net=net, adversarial=adversarial, lr=0.05, val_robust_n=0)
    x_all, y_all = load_cifar10(tiny_cifar_dir, train=True)
    x = x_all.float() / 255
    before = _train_loss(net, x, y_all)
    _trainer(max_epochs=6, limit_val_batches=0).fit(module, datamodule=dm)
    after = _train_loss(module.net, x, y_all)
    assert after < 0.8 * before, (before, after)


def test_validation_and_test_report_clean_and_robust_accuracy(tiny_cifar_dir, tiny_classifier_ckpt):
    dm = CIFAR10DataModule(
        data_dir=str(tiny_cifar_dir), val_size=20, batch_size=20, eval_batch_size=20, augment=True
    )
    module = ClassifierModule(
        net=CifarResNet(depth=8), adversarial="pgd", pgd_steps=2, alpha="2/255", val_robust_n=10
    )
    trainer = _trainer(
        max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, limit_val_batches=1
    )
    trainer.fit(module, datamodule=dm)
    assert {"train/loss", "val/acc", "val/acc_pgd"} <= set(trainer.callback_metrics)

    tester = ClassifierModule(checkpoint=str(tiny_classifier_ckpt), test_pgd_steps=2)
    assert tester.checkpoint_info["sha256"]
    (res,) = _trainer().test(tester, datamodule=dm, verbose=False)
    assert 0.0 <= res["test/acc"] <= 1.0 and 0.0 <= res["test/acc_pgd"] <= 1.0
    # test/acc is the accuracy of the loaded network on the test split.
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    with torch.no_grad():
        acc = (tester.net.eval()(x.float() / 255).argmax(1) == y).float().mean().item()
    assert res["test/acc"] == pytest.approx(acc, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="adversarial"):
        ClassifierModule(net=CifarResNet(depth=8), adversarial="bogus")
    with pytest.raises(ValueError, match="--model.net or --model.checkpoint"):
        ClassifierModule()
    with pytest.raises(ValueError, match="eps"):
        ClassifierModule(net=CifarResNet(depth=8), eps="8/zero")
