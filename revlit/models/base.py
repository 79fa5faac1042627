"""Classifier contract shared by every model in revlit.

Every classifier takes images in [0, 1] (float, NCHW), normalises them itself, and exposes its
penultimate feature vector so the self-supervised head of Mao et al. (ICCV 2021) can read it
without running the backbone twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Classifier(nn.Module):
    """Base class: normalisation inside, ``features`` + ``logits_from_features`` = ``forward``.

    Subclasses implement :meth:`_features` on *normalised* input and set ``feature_dim`` and
    ``fc`` (the last linear layer).

    Args:
        mean: per-channel mean used for normalisation; ``None`` means identity (raw [0,1] input,
            as Carmon et al.'s RST checkpoint expects).
        std: per-channel standard deviation; ``None`` means identity.
    """

    feature_dim: int
    num_classes: int

    def __init__(
        self,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] | None = CIFAR10_STD,
    ) -> None:
        super().__init__()
        mean_t = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std_t = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def arch_spec(self) -> tuple[str, dict]:
        """``(class path, constructor kwargs)`` from which :func:`revlit.models.build` rebuilds it."""
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}", dict(getattr(self, "config", {}))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Args:
            x: images in [0, 1], shape (N, 3, H, W).

        Returns:
            Tensor of shape (N, feature_dim), after global pooling, before the last linear layer.
        """
        return self._features(self.normalize(x))

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) from penultimate features (N, feature_dim)."""
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images in [0, 1] of shape (N, 3, H, W)."""
        return self.logits_from_features(self.features(x))


@contextlib.contextmanager
def frozen_eval(*modules: object) -> Iterator[None]:
    """Put every given ``nn.Module`` in eval mode with frozen parameters; restore both afterwards.

    Non-modules (plain functions, ``None``) are ignored. Eval mode means BatchNorm uses (and never
    updates) its running statistics; frozen parameters mean autograd builds no weight-gradient
    path, so attacks and defenses take gradients w.r.t. the input only. Every submodule's own
    training flag and every parameter's ``requires_grad`` are restored, also on error.
    """
    mods = [m for m in modules if isinstance(m, nn.Module)]
    modes = [(sub, sub.training) for m in mods for sub in m.modules()]
    flags = [(p, p.requires_grad) for m in mods for p in m.parameters()]
    try:
        for m in mods:
            m.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for sub, training in modes:
            sub.training = training
        for p, req in flags:
            p.requires_grad_(req)
