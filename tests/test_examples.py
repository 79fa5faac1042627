"""A user's own module, given by class path, through the example configs: head training, a stored
PGD set and a defended predict, every artefact tied to the sha256 of the user's weights file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from examples.my_classifier import SmallCNN
from revlit.cli import main
from revlit.data.stored import load_stored_set
from revlit.io import sha256_file
from revlit.records import load_record
from revlit.ssl import load_head

REPO = Path(__file__).resolve().parents[1]
EX = REPO / "examples"


def _run(args: list[str], cwd: Path) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        main(args)
    finally:
        os.chdir(old)


def test_user_module_through_head_training_stored_set_and_defended_predict(
    tmp_path, tiny_cifar_dir
):
    torch.manual_seed(0)
    net = SmallCNN(width=4)
    with torch.no_grad():
        net.train()(torch.rand(16, 3, 32, 32))
    weights = tmp_path / "my_cnn.pt"
    torch.save(net.eval().state_dict(), weights)
    sha = sha256_file(weights)
    spec = json.dumps(
        {"class_path": "examples.my_classifier.SmallCNN", "init_args": {"width": 4},
         "weights": str(weights)}
    )  # fmt: skip
    data = [f"--data.init_args.data_dir={tiny_cifar_dir}", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    head = tmp_path / "head.pt"
    _run(["fit", "--config", str(EX / "ssl_head.yaml"), f"--model.init_args.classifier={spec}",
          f"--model.init_args.export_path={head}", "--data.init_args.batch_size=8",
          "--data.init_args.eval_batch_size=10", "--data.init_args.val_size=20",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=1", *data], tmp_path)  # fmt: skip
    h, info = load_head(head, classifier_sha256=sha)
    assert info["in_dim"] == 16  # the feature size of SmallCNN(width=4), inferred
    _run(["predict", "--config", str(EX / "attack_linf.yaml"), f"--model.init_args.classifier={spec}",
          "--model.init_args.steps=1", "--data.init_args.test_subset=8",
          "--data.init_args.eval_batch_size=4", *data], tmp_path)  # fmt: skip
    stored = load_stored_set(tmp_path / "data" / "pgd" / "my_cnn_l_inf")
    assert len(stored) == 8 and stored.meta["classifier_sha256"] == sha
    _run(["predict", "--config", str(EX / "defend_linf.yaml"), f"--model.init_args.classifier={spec}",
          f"--model.init_args.head={head}", "--model.init_args.defense.init_args.steps=1",
          "--model.init_args.defense.init_args.n_views=2", "--data.init_args.pgd_root=data/pgd",
          "--data.init_args.test_subset=8", "--data.init_args.eval_batch_size=4", *data],
         tmp_path)  # fmt: skip
    rec = load_record(tmp_path / "results" / "defense_my_cnn_l_inf" / "record_reverse.json")
    assert rec["n"] == 8 and rec["classifier"]["sha256"] == sha
    assert rec["data"]["split"] == "my_cnn_l_inf" and rec["defense"]["steps"] == 1
