"""A classifier revlit has never seen: a small CIFAR-10 CNN as a user might write it.

revlit needs nothing of it but an ``nn.Module`` whose ``forward`` takes images in [0, 1]
(N, 3, 32, 32) and returns logits (N, 10), normalising inside itself, and a state dict. Its
penultimate features are found by revlit as the input of its last linear layer (``self.fc``).

Train it briefly on CIFAR-10 and write its state dict (a plain ``torch.save`` of ``state_dict()``)::

    python examples/my_classifier.py --out checkpoints/my_cnn.pt [--steps 200]

then hand it to any revlit stage with ``classifier: {class_path: examples.my_classifier.SmallCNN,
init_args: {width: 32}, weights: checkpoints/my_cnn.pt}`` (see the YAML files beside this one).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (width, 2·width, 4·width), global pooling and a linear layer."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1))
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


def train(steps: int, batch_size: int, width: int, seed: int, data_dir: str) -> SmallCNN:
    """A few hundred Adam steps on random crops/flips of the CIFAR-10 training set."""
    from revlit.data.cifar import load_cifar10

    torch.manual_seed(seed)
    x, y = load_cifar10(data_dir, train=True)
    net = SmallCNN(width)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,))
        xb = x[idx].float().div_(255.0)
        flip = torch.rand(batch_size) < 0.5
        xb[flip] = xb[flip].flip(3)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def test_accuracy(net: nn.Module, data_dir: str, n: int = 1000) -> float:
    from revlit.data.cifar import load_cifar10

    x, y = load_cifar10(data_dir, train=False)
    pred = torch.cat([net(xb.float() / 255.0).argmax(1) for xb in x[:n].split(250)])
    return float((pred == y[:n]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="checkpoints/my_cnn.pt")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("REVLIT_DATA_DIR", "data"))
    a = p.parse_args()
    t0 = time.time()
    net = train(a.steps, a.batch_size, a.width, a.seed, a.data_dir)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    torch.save(net.state_dict(), a.out)
    acc = test_accuracy(net, a.data_dir)
    print(
        f"wrote {a.out}: clean accuracy {acc:.3f} on the first 1000 test images ({time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
