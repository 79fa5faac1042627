"""The defended classifier as one ``nn.Module``: hand it to AutoAttack, torchattacks or your own loop.

``DefendedClassifier(x) = classifier(purify(x))`` where ``purify`` is a test-time defense of
:mod:`revlit.defenses` (by default the reverse attack of Mao et al., ICCV 2021). Images are [0, 1]
float NCHW; the output is logits (N, num_classes). Framework-free (no Lightning).

The purifier is itself a gradient-based optimisation, so "the gradient of the defended model" must
be chosen (Athalye et al., ICML 2018; Croce et al., ICML 2022). ``gradient`` selects it:

* ``"bpda"`` (straight-through): the purifier's Jacobian is taken as the identity, so the gradient
  w.r.t. x is the classifier's input gradient *at the purified point* ``purify(x)``; the logits are
  those of the defended model. With a fresh purifier seed per call, an attack that averages
  several calls is BPDA+EOT.
* ``"none"``: the output carries no gradient to x (the purified input is detached); a
  gradient-based attack gets an error, a score- or decision-based one (e.g. Square) works.

A third mode, the exact derivative through the unrolled purifier, is not offered: the Linf
reverse attack moves by ``step·sign(∇L)``, whose derivative is zero almost everywhere, so autograd
through the loop would return only the projections' 0/1 masks (BPDA with masks, no information on
the loss); for L2 it would need second derivatives through every step and view
(``create_graph=True`` over steps × views backbone graphs), far beyond the memory of one batch.

Randomness: the purifier's random start and views come from a CPU generator seeded, per call,
``seed · 2**24 + call number`` (``fixed=False``, the deployed defense: each query draws fresh
randomness, which EOT must average) or ``seed`` on every call (``fixed=True``: a deterministic
function, e.g. to compare attacks on identical randomness). The contrastive loss takes its
negatives from the batch, so a purified image depends on the other images of the call.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from revlit.seeding import SEED_STRIDE

GRADIENTS = ("bpda", "none")


class DefendedClassifier(nn.Module):
    """``classifier(purify(x))`` with a chosen gradient (see the module docstring).

    Args:
        classifier: logits (N, num_classes) for images in [0, 1] (any :mod:`revlit.models`
            classifier, or :class:`revlit.models.ExternalClassifier`).
        defense: a bound defense (:class:`revlit.defenses.ReversePurifier` built with the
            classifier, head, loss and views, or any object with ``defend(x, generator)`` /
            ``purify(x, generator)``).
        gradient: ``"bpda"`` or ``"none"``.
        seed: seed of the purifier's randomness.
        fixed: reuse ``seed`` on every call instead of ``seed · 2**24 + call number``.
        context: images in [0, 1] (M, C, H, W) that fill a call of fewer than ``min_batch``
            images (the contrastive loss takes its negatives from the batch; AutoAttack, for
            one, calls the model on the few points still robust, down to a single one). The
            context images are purified together with the call's images and dropped.
        min_batch: the smallest batch purified (default 2, the contrastive loss's minimum).
    """

    def __init__(
        self,
        classifier: nn.Module,
        defense,
        gradient: str = "bpda",
        seed: int = 0,
        fixed: bool = False,
        context: torch.Tensor | None = None,
        min_batch: int = 2,
    ) -> None:
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got '{gradient}'")
        if not (hasattr(defense, "defend") or hasattr(defense, "purify")):
            raise ValueError(f"{type(defense).__name__} has neither defend() nor purify()")
        self.classifier = classifier
        self.defense = defense
        self.gradient, self.seed, self.fixed = gradient, int(seed), bool(fixed)
        self.context = None if context is None else context.detach()
        self.min_batch = int(min_batch)
        if self.context is not None and len(self.context) < self.min_batch - 1:
            raise ValueError(f"context needs >= {self.min_batch - 1} images, got {len(context)}")
        #: number of forward calls so far (the per-call seed's counter)
        self.calls = 0

    def generator(self) -> torch.Generator:
        """The CPU generator of the next call (advances the call counter)."""
        s = self.seed if self.fixed else (self.seed * SEED_STRIDE + self.calls) % (1 << 63)
        self.calls += 1
        return torch.Generator().manual_seed(s)

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Purified images (N, C, H, W) in [0, 1], detached (no gradient to x)."""
        x = x.detach()
        n = len(x)
        if generator is None:
            generator = self.generator()
        if n < self.min_batch:
            if self.context is None:
                raise ValueError(
                    f"a batch of {n} image(s) is below min_batch={self.min_batch} (the contrastive "
                    "loss takes its negatives from the batch): give DefendedClassifier a context"
                )
            x = torch.cat([x, self.context[: self.min_batch - n].to(x)])
        if hasattr(self.defense, "defend"):
            images, _ = self.defense.defend(x, generator)
            out = images[getattr(self.defense, "steps", 0)]
        else:
            out = self.defense.purify(x, generator)[0]
        return out[:n].detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of the purified images; gradient per ``self.gradient``."""
        x_def = self.purify(x)
        if self.gradient == "bpda" and x.requires_grad:
            # value exactly x_def (x - x.detach() is 0), derivative w.r.t. x the identity
            x_def = x_def + (x - x.detach())
        return self.classifier(x_def)

    def extra_repr(self) -> str:
        return f"gradient={self.gradient}, seed={self.seed}, fixed={self.fixed}"


def load_defended(
    classifier: str | os.PathLike | dict,
    head: str | os.PathLike,
    gradient: str = "bpda",
    seed: int = 0,
    fixed: bool = False,
    context: torch.Tensor | None = None,
    allow_mismatch: bool = False,
    **purifier: object,
) -> tuple[DefendedClassifier, dict]:
    """Load a classifier (any spec of :func:`revlit.models.load_classifier`) and its SSL head and
    wrap them with the reverse attack, whose loss and views are the ones the head was trained with.

    Args:
        classifier: classifier spec.
        head: SSL head checkpoint trained on that classifier (checked by sha256).
        gradient, seed, fixed, context: see :class:`DefendedClassifier`.
        allow_mismatch: accept a head trained on another classifier.
        **purifier: settings of :class:`revlit.defenses.ReversePurifier` (``eps``, ``steps``, ...).

    Returns:
        ``(defended model in eval mode, info)`` with the classifier's and head's info and the
        purifier's settings.
    """
    from revlit.defenses import ReversePurifier
    from revlit.losses import make_loss
    from revlit.models import load_classifier
    from revlit.ssl.head import head_training, load_head
    from revlit.ssl.views import SimCLRViews

    net, cinfo = load_classifier(classifier)
    h, hinfo = load_head(head, cinfo["sha256"], allow_mismatch=allow_mismatch)
    rec = head_training(hinfo)
    defense = ReversePurifier(
        classifier=net,
        head=h,
        loss=make_loss(rec["loss"], rec["temperature"]),
        views=SimCLRViews(mode=rec["view_mode"]),
        **purifier,
    )
    model = DefendedClassifier(
        net, defense, gradient=gradient, seed=seed, fixed=fixed, context=context
    ).eval()
    info = {"classifier": cinfo, "head": hinfo, "defense": defense.settings()}
    return model, info
