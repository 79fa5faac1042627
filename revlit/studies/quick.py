"""Quick-mode assets: a tiny classifier, head, bank, CIFAR-10-like data and attacked sets, in seconds.

Every study has a quick mode (``--quick``) that runs its real code path end to end on these tiny,
synthetic stand-ins, so ``make test`` exercises each study (plots, tables, JSON) in seconds. The
numbers a quick run prints mean nothing: the data are synthetic 32x32 class-coloured patterns, the
classifier a ResNet-8 trained for a few steps, the head random, the attacks 2-step PGD.

Layout written under ``root`` (reused if complete)::

    cifar/cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta (torchvision layout)
    classifier.pt                revlit classifier checkpoint (CifarResNet depth 8)
    head.pt, head_bank.pt        SSL head (random, 32 hidden, 8 out) and its bank of negatives
    pgd/classifier_l_inf|l_2|l_1 stored sets for the first n_test test images
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

QUICK_VERSION = "1"


@dataclass
class QuickAssets:
    """Paths of the quick-mode stand-ins (see the module docstring)."""

    root: Path
    data_dir: Path
    classifier: Path
    head: Path
    bank: Path
    pgd_root: Path
    set_prefix: str = "classifier"


def synthetic_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images (uint8 (n, 3, 32, 32)) and labels: a colour and stripes per class."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    colours = np.random.default_rng(99).uniform(50, 205, size=(10, 3))
    yy, xx = np.mgrid[0:32, 0:32]
    out = np.empty((n, 3, 32, 32))
    for i, c in enumerate(labels):
        wave = 35.0 * np.cos((xx * (1 + c % 4) + yy * (c // 4 + 1)) * np.pi / 10)
        out[i] = colours[c][:, None, None] + wave + rng.normal(0, 18, (3, 32, 32))
    return np.clip(out, 0, 255).round().astype(np.uint8), labels


def _write_batches(folder: Path, n_train: int, n_test: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = synthetic_cifar(n_train, 1)
    x_te, y_te = synthetic_cifar(n_test, 2)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x.reshape(len(x), -1), b"labels": y.tolist()}, f, protocol=2)

    for b, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        dump(f"data_batch_{b}", x_tr[part], y_tr[part])
    dump("test_batch", x_te, y_te)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f, protocol=2)


def make_quick_assets(root: str | os.PathLike, n_train: int = 320, n_test: int = 48) -> QuickAssets:
    """Write (or reuse) the quick-mode assets under ``root`` and return their paths."""
    from revlit.attacks.pgd import pgd
    from revlit.data.cifar import load_cifar10
    from revlit.data.stored import save_stored_set
    from revlit.defenses.bank import compute_bank, save_bank
    from revlit.models.checkpoint import save_classifier, sha256_file
    from revlit.models.resnet import CifarResNet
    from revlit.ssl.head import SSLHead, save_head
    from revlit.ssl.views import SimCLRViews

    root = Path(root)
    a = QuickAssets(
        root,
        root / "cifar",
        root / "classifier.pt",
        root / "head.pt",
        root / "head_bank.pt",
        root / "pgd",
    )
    done = root / f"complete-{QUICK_VERSION}-{n_train}-{n_test}"
    if done.exists():
        return a
    _write_batches(a.data_dir / "cifar-10-batches-py", n_train, n_test)
    x_tr, y_tr = load_cifar10(a.data_dir, train=True, check_md5=False)
    x_te, y_te = load_cifar10(a.data_dir, train=False, check_md5=False)
    xf, xt = x_tr.float() / 255.0, x_te.float() / 255.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = CifarResNet(depth=8, width=1)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        net.train()
        for step in range(16):  # a few steps: accuracies above chance, so attacks have work
            j = torch.randint(0, len(xf), (32,))
            loss = torch.nn.functional.cross_entropy(net(xf[j]), y_tr[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            del step
        net.eval()
        save_classifier(net, a.classifier, meta={"note": "revlit studies quick-mode classifier"})
        c_sha = sha256_file(a.classifier)
        head = SSLHead(net.feature_dim, 32, 8)
        head.train()(torch.randn(64, net.feature_dim))  # non-trivial BatchNorm statistics
        head.eval()
        meta = {"loss": "nt_xent", "temperature": 0.2, "views": repr(SimCLRViews())}
        h_sha = save_head(head, a.head, c_sha, meta)
        emb = compute_bank(net, head, x_tr[:64], SimCLRViews(), 1, torch.Generator().manual_seed(0))
        save_bank(a.bank, emb, h_sha, c_sha, torch.arange(64), {"m": 64})
        for norm, eps in (("l_inf", 8 / 255), ("l_2", 0.5), ("l_1", 12.0)):
            x_adv = pgd(
                net, xt, y_te, norm, eps, steps=2, generator=torch.Generator().manual_seed(0)
            )
            save_stored_set(
                a.pgd_root / f"{a.set_prefix}_{norm}",
                x_adv,
                y_te,
                torch.arange(len(y_te)),
                {"classifier_sha256": c_sha, "norm": norm, "eps": eps, "steps": 2},
            )
    done.touch()
    return a
