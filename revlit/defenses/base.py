"""What every test-time defense is: settings first, networks bound later, ``defend(x, generator)``.

A defense is configured without any network (so YAML can select it with ``class_path``/
``init_args`` and a notebook can build it in one line) and is *bound* to the frozen classifier, its
SSL head, the SSL loss and the views when those are loaded (:meth:`Defense.bind`). Images are
[0, 1] float NCHW; all randomness comes from the ``generator`` argument.

Threat model: a defense sees the input only (no label), never changes the model, and its output
stays in [0, 1].
"""

from __future__ import annotations

import torch

from revlit.attacks.norms import Norm

SUPPORTED_NORMS = (Norm.LINF, Norm.L2)


def check_images(x: torch.Tensor, name: str = "images") -> None:
    """Refuse anything that is not a batch of finite images in [0, 1].

    Args:
        x: expected float (N, C, H, W) with every value in [0, 1].
        name: how the error message names the tensor.

    Raises:
        ValueError: one line saying what is wrong (shape, dtype, NaN/inf, or range).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contain {bad} NaN or infinite values; refusing to defend them")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def parse_norm(norm: Norm | str) -> Norm:
    """:meth:`Norm.parse` restricted to the norms the purifiers support (Linf and L2)."""
    norm = Norm.parse(norm)
    if norm not in SUPPORTED_NORMS:
        raise ValueError(f"the defense supports norms l_inf and l_2, got {norm.value}")
    return norm


#: the defense budget ε_r: 16/255 in Linf (Mao et al., ICCV 2021), shared by the reverse attack
#: and its random-noise baseline
EPS_R = 16 / 255


class Defense:
    """Base class of revlit's test-time defenses (framework-free).

    Subclasses set :attr:`method` and implement :meth:`defend`; those that need networks override
    :meth:`bind`.
    """

    #: name in records (``none``, ``noise``, ``reverse``)
    method = "none"
    #: descent steps of an iterative defense (0: one-shot); keys the traced iterates
    steps = 0
    #: whether each image draws from its own generator (batch-independent) instead of the batch's
    per_image = False
    #: whether ``defend`` needs input gradients (cannot run under ``torch.inference_mode``)
    needs_grad = False

    def bind(self, classifier, head, loss, views) -> Defense:
        """Attach the loaded parts (classifier, SSL head, SSL loss, views); returns ``self``."""
        return self

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (for result records)."""
        return {"method": self.method}

    def passes_per_image(self) -> int:
        """Backbone passes a defended prediction costs per image (the classification counts 1)."""
        return 1

    def defend(
        self, x: torch.Tensor, generator=None, trace=None
    ) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
        """Defended images and per-example extras.

        Args:
            x: images in [0, 1], (N, C, H, W).
            generator: a CPU generator, or one per image when :attr:`per_image`.
            trace: iterative defenses also return these intermediate iterates.

        Returns:
            ``({steps: x_def}, extras)``: the defended images keyed by the steps taken to reach
            them (:attr:`steps` is the returned result), and per-example tensors (first dim N).
        """
        raise NotImplementedError

    def purify(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """The defended images (N, C, H, W) alone."""
        images, _ = self.defend(x, generator)
        return images[self.steps]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoDefense(Defense):
    """The identity: the classifier as it is (the undefended row of every table)."""

    def defend(self, x, generator=None, trace=None):
        check_images(x)
        return {0: x}, {}
