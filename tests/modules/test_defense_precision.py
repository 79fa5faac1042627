"""DefenseModule under Lightning's ``precision="bf16-mixed"``: the backbone runs in bf16 inside
the purifier, the purifier's own arithmetic and the final decision stay float32."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from revlit.callbacks.writers import run_settings
from revlit.modules.defense import DefenseModule
from tests.modules.test_defense import ckpts, datamodule, short  # noqa: F401

EPS = 16 / 255


class Dtypes(pl.Callback):
    """Records the output dtype of every classifier forward (a decision) and of the first conv,
    split by whether it ran inside a decision or inside the purifier / the SSL probe."""

    def on_predict_start(self, trainer, module):
        self.decisions, self.convs, self.deciding = [], {True: [], False: []}, False
        conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))

        def enter(m, i):
            self.deciding = True

        def leave(m, i, o):
            self.deciding = False
            self.decisions.append(o.dtype)

        self.hooks = [
            module.net.register_forward_pre_hook(enter),
            module.net.register_forward_hook(leave),
            conv.register_forward_hook(lambda m, i, o: self.convs[self.deciding].append(o.dtype)),
        ]

    def on_predict_end(self, trainer, module):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_predict_in_bf16_mixed_keeps_the_decision_and_the_box_float32(
    tmp_path,
    tiny_cifar_dir,
    ckpts,  # noqa: F811
    precision,
):
    clf, head = ckpts
    module = DefenseModule(str(clf), str(head), defense=short(), viz_images=0)
    seen = Dtypes()
    tr = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[seen], enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, precision=precision,
    )  # fmt: skip
    out = tr.predict(module, datamodule=datamodule(tiny_cifar_dir, bs=8))
    rows = {k: torch.cat([o[k] for o in out]) for k in out[0]}
    bf16 = precision == "bf16-mixed"
    # the backbone in the purifier follows the trainer; the classifications are float32
    assert set(seen.convs[False]) == {torch.bfloat16 if bf16 else torch.float32}
    assert set(seen.convs[True]) == set(seen.decisions) == {torch.float32}
    for key in ("loss", "loss_def", "ssl_steps", "ssl_before", "ssl_after", "delta_linf"):
        assert rows[key].dtype == torch.float32 and torch.isfinite(rows[key]).all(), key
    assert (rows["delta_linf"] <= EPS + 1e-6).all() and (rows["delta_linf"] > 0).all()
    # records and the resume key say which precision made the outputs
    assert module.defense_settings()["trainer_precision"] == precision
    assert run_settings(tr, module)["precision"] == precision
