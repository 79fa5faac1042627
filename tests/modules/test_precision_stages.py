"""Attack-set generation and the adaptive evaluation accept Lightning's ``bf16-mixed``: outputs
are float32, finite, inside their balls and the [0, 1] box."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from revlit.data.cifar import load_cifar10
from revlit.data.datamodule import CIFAR10DataModule
from revlit.modules.adaptive import AdaptiveModule
from revlit.modules.attack import AttackModule
from tests.modules.test_adaptive_module import ckpts, tiny  # noqa: F401


def predict(module, data_dir, callbacks=(), n=8, bs=4):
    dm = CIFAR10DataModule(data_dir=str(data_dir), test_subset=n, eval_batch_size=bs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, precision="bf16-mixed",
        callbacks=list(callbacks),
    )  # fmt: skip
    return trainer.predict(module, datamodule=dm)


class BackboneDtypes(pl.Callback):
    """The output dtypes of the classifier's first conv during predict."""

    def on_predict_start(self, trainer, module):
        conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
        self.seen: set[torch.dtype] = set()
        self.hook = conv.register_forward_hook(lambda m, i, o: self.seen.add(o.dtype))

    def on_predict_end(self, trainer, module):
        self.hook.remove()


def test_pgd_set_generation_in_bf16_mixed(tiny_cifar_dir, tiny_classifier_ckpt):
    module = AttackModule(classifier=str(tiny_classifier_ckpt), steps=3, set_name="bf16")
    seen = BackboneDtypes()
    out = predict(module, tiny_cifar_dir, [seen])
    assert torch.bfloat16 in seen.seen  # the attack's backbone ran in bf16
    xs, _ = load_cifar10(tiny_cifar_dir, train=False)
    idx = torch.cat([o["index"] for o in out])
    x, adv = xs[idx].float() / 255, torch.cat([o["image"] for o in out])
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert ((adv >= x - 8 / 255) & (adv <= x + 8 / 255)).all()  # the float32 ball, exactly
    assert adv.min() >= 0 and adv.max() <= 1 and not torch.equal(adv, x)
    assert all(torch.isfinite(o["adv_loss"]).all() for o in out)


def test_adaptive_evaluation_in_bf16_mixed(tiny_cifar_dir, ckpts):  # noqa: F811
    clf, head = ckpts
    module = AdaptiveModule(str(clf), str(head), **tiny())
    seen = BackboneDtypes()
    out = predict(module, tiny_cifar_dir, [seen])
    assert torch.bfloat16 in seen.seen and torch.float32 in seen.seen  # attacks, decisions
    floats = [v for o in out for v in o.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(torch.isfinite(v).all() for v in floats)


def test_the_defended_decision_of_the_adaptive_evaluation_is_float32(tiny_classifier_ckpt):
    from revlit.attacks.adaptive import evaluate_defense
    from revlit.defenses import ReversePurifier
    from revlit.models.checkpoint import load_classifier
    from revlit.ssl import SSLHead

    net, _ = load_classifier(tiny_classifier_ckpt)
    pur = ReversePurifier(classifier=net, head=SSLHead(64, 16, 8).eval(), steps=1, n_views=2)
    dtypes = []
    hook = net.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            correct, ce = evaluate_defense(net, pur, x, y, draws=2, generator=torch.Generator())
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.float32}
    assert ce.dtype == torch.float32 and correct.shape == (2, 4)
