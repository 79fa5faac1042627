"""The reverse attack: repair an input by *lowering* a self-supervised contrastive loss.

Mao, Chiquier, Wang, Yang & Vondrick, "Adversarial Attacks are Reversible with Natural
Supervision" (ICCV 2021). An adversarial perturbation made against a classifier also disturbs the
natural structure a self-supervised task measures (here: agreement between random SimCLR views of
the same image, read through the classifier's features and a small projection head). At test time
the defense searches a small ball for a *reverse vector* δ_r that restores that structure::

    δ_r = argmin_{‖δ‖ ≤ ε_r, x + δ ∈ [0,1]^d}  L_ssl(views(x + δ))

with projected signed-gradient descent (Linf; normalised-gradient steps for L2), fresh random views
at every step, a uniform random start, and projection onto (ε_r-ball ∩ [0,1] box) after every step.
The classifier then labels ``x + δ_r``. Threat model of the *defense*: it never sees labels, never
changes the model (parameters, BatchNorm statistics) and only moves the input.

Shapes and ranges: images (N, C, H, W) float in [0, 1]; views are view-major (row ``v*N + i`` is
view v of image i); the contrastive loss with ``reduction="none"`` gives one value per image (N,).

Everything here is framework-free; :class:`revlit.modules.defense.DefenseModule` orchestrates it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from revlit.attacks.norms import Norm, l2_step, linf_step, project, random_init
from revlit.defenses.noise import check_images, parse_norm
from revlit.models.base import frozen_eval
from revlit.models.fold import fold_batchnorm
from revlit.models.lean import MaskArena, lean_input_grad
from revlit.ssl.head import ssl_loss
from revlit.utils import as_float

SELECT = ("last", "best")
#: default MiB of float ReLU outputs a lean step keeps before it makes masks (see ``relu_float_mb``)
RELU_FLOAT_MB = 384.0


class ReversePurifier:
    """Projected descent on a contrastive loss over fresh views (the reverse attack of Mao et al.).

    Args:
        classifier: a :class:`revlit.models.Classifier` (``features(x) -> (N, feature_dim)`` for
            x in [0, 1]); only its features are used.
        head: the SSL projection head, ``head(features) -> z`` (N, out_dim).
        loss: contrastive loss callable ``loss(z, n_views, reduction="none") -> (N,)`` on
            view-major embeddings (e.g. :class:`revlit.losses.ContrastiveLoss`). It must be the
            loss the head was trained with.
        views: view generator ``views(x, n_views, generator) -> (n_views*N, C, H, W)``,
            view-major, differentiable w.r.t. x (e.g. :class:`revlit.ssl.views.SimCLRViews`).
        norm: ``Norm.LINF`` (default, signed-gradient steps) or ``Norm.L2`` (normalised-gradient
            steps).
        eps: radius ε_r of the ball (default 16/255, the authors' Linf budget). "16/255" accepted.
        step_size: step length (default 2/255).
        steps: number of descent steps (default 40).
        n_views: views per image per step (default 4).
        select: ``"last"`` returns the last iterate (the authors' choice); ``"best"`` the iterate
            of lowest recorded loss per example (ties keep the earlier iterate).
        random_start: start from ``clip(x + u)``, u uniform in the ball (default True).
        chunk_size: the backbone runs over at most this many views at a time; the chunks feed
            one loss and one gradient (keeps allocations small; see DESIGN.md §4). Default 256:
            ResNet-20's fastest batch here (3 % faster steps than 512, measured); features and
            gradients are bitwise the same for any chunking.
        fold_bn: run the loss through a copy of the classifier with eval-mode BatchNorm folded
            into the convolutions (:func:`revlit.models.fold.fold_batchnorm`): the same function
            to float rounding, ~1.3x faster input gradients and half the saved activations on
            ResNet-20. Off by default: signed steps amplify rounding differences (a flip on a
            ~0 gradient entry moves a pixel by a whole step), so the repaired images are not
            those of the plain loop pixel for pixel.
        recompute: bound the memory of a step by the chunk instead of the batch: run the
            backbone over all views without a graph, take the loss's gradient w.r.t. the
            features, then re-run each chunk with a graph and back-propagate its part. Costs one
            extra backbone forward per step; the gradient is the same computation.
        lean: run the backbone under :func:`revlit.models.lean.lean_input_grad`: conv and
            eval BatchNorm save nothing for the backward pass and ReLUs a 1-byte mask, so a step
            keeps ~0.18 MB per view of ResNet-20 activations instead of ~1.5 MB. The input
            gradient is bitwise the one of the default path (same ATen kernels), so the
            repaired images are identical.
        relu_float_mb: with ``lean``, a step keeps its first ReLU outputs, up to this many MiB,
            as floats (autograd's own ReLU) and masks only beyond: making masks costs 5–16 %
            of a ResNet-20 forward (paired A/Bs), a float output 4x a mask's memory. Default 384:
            ResNet-20 at 2 views × 256 images (368 MiB of ReLU outputs) runs on floats only,
            the authors' 4 × 512 (1.4 GiB) on masks past the first 384 MiB (peak 1.8 GB with
            512, measured, against the 2 GB target). 0: masks only. The gradient is the same
            either way (bitwise).

    ``purify`` computes gradients w.r.t. the input only (``torch.autograd.grad``), with every
    module in eval mode and its parameters frozen for the duration (modes and ``requires_grad``
    flags are restored afterwards), so parameters and BatchNorm buffers stay bit-identical.
    All randomness (start, views) comes from the ``generator`` argument.
    """

    def __init__(
        self,
        classifier: nn.Module,
        head: nn.Module,
        loss: Callable[..., torch.Tensor],
        views: Callable[..., torch.Tensor],
        norm: Norm | str = Norm.LINF,
        eps: float | str = 16 / 255,
        step_size: float | str = 2 / 255,
        steps: int = 40,
        n_views: int = 4,
        select: str = "last",
        random_start: bool = True,
        chunk_size: int = 256,
        fold_bn: bool = False,
        recompute: bool = False,
        lean: bool = True,
        relu_float_mb: float = RELU_FLOAT_MB,
    ) -> None:
        self.classifier, self.head, self.loss, self.views = classifier, head, loss, views
        self.fold_bn, self.recompute, self.lean = bool(fold_bn), bool(recompute), bool(lean)
        self._folded: tuple[tuple, nn.Module] | None = None
        # the lean path's ReLU masks: one set of blocks, handed out again at every step
        self._arena = MaskArena(reuse=True)
        self.norm = parse_norm(norm)
        self.eps = as_float(eps, "eps")
        self.step_size = as_float(step_size, "step_size")
        if self.eps < 0 or self.step_size < 0:
            raise ValueError(f"eps and step_size must be >= 0, got {self.eps}, {self.step_size}")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps}")
        if int(n_views) != n_views or n_views < 2:
            raise ValueError(f"n_views must be an integer >= 2 (a contrastive loss), got {n_views}")
        if select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got '{select}'")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not relu_float_mb >= 0:
            raise ValueError(f"relu_float_mb must be >= 0, got {relu_float_mb}")
        self.relu_float_mb = float(relu_float_mb)
        self.steps, self.n_views, self.select = int(steps), int(n_views), select
        self.random_start, self.chunk_size = bool(random_start), int(chunk_size)
        #: per example, the iterate ``purify`` returned (0 = start, ``steps`` = last); set by purify.
        self.selected_step: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"ReversePurifier(norm={self.norm.value}, eps={self.eps:.6g}, "
            f"step_size={self.step_size:.6g}, steps={self.steps}, n_views={self.n_views}, "
            f"select={self.select}, random_start={self.random_start})"
        )

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (for result records)."""
        return {
            "method": "reverse",
            "norm": self.norm.value,
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "n_views": self.n_views,
            "select": self.select,
            "random_start": self.random_start,
            "chunk_size": self.chunk_size,
            "fold_bn": self.fold_bn,
            "recompute": self.recompute,
            "lean": self.lean,
            "relu_float_mb": self.relu_float_mb,
            "view_mode": getattr(self.views, "mode", None),
        }

    def view_passes(self) -> dict[str, int]:
        """Backbone passes per image of one ``purify`` call, counted in views.

        ``forward``: (steps + 1)·n_views (one per step plus the loss of the last iterate);
        ``backward``: steps·n_views input-gradient passes.
        """
        return {
            "forward": (self.steps + 1) * self.n_views,
            "backward": self.steps * self.n_views,
        }

    # ----------------------------------------------------------------- the SSL loss
    def backbone(self) -> nn.Module:
        """The classifier the loss runs through: with ``fold_bn``, its BatchNorm-folded twin.

        The folded copy (:func:`revlit.models.fold.fold_batchnorm`) computes the same features
        to float rounding with about half the saved activations and ~1.3x the input-gradient
        throughput. It is rebuilt whenever the classifier's parameters or buffers change
        (in-place updates bump their version), move device or change dtype.
        """
        if not self.fold_bn:
            return self.classifier
        tensors = list(self.classifier.parameters()) + list(self.classifier.buffers())
        key = tuple((id(t), t._version, t.device, t.dtype) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            folded, _ = fold_batchnorm(self.classifier)
            if folded is not self.classifier:
                fmt = (
                    torch.channels_last
                    if any(
                        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                        and not p.is_contiguous()
                        for p in self.classifier.parameters()
                    )
                    else torch.contiguous_format
                )  # fmt: skip
                folded = folded.to(memory_format=fmt)
            self._folded = (key, folded)
        return self._folded[1]

    def _relu_float_bytes(self) -> int:
        return int(self.relu_float_mb * 2**20)

    def _next_arena(self) -> MaskArena:
        """The mask arena, reset: the previous step's graph (and its masks) is gone by now."""
        self._arena.reset()
        return self._arena

    def _per_image_loss(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-image contrastive loss (N,) of fresh views of ``x`` (graph kept if x needs grad)."""
        n = x.shape[0]
        lean = self.lean and x.requires_grad
        per = ssl_loss(
            self.backbone(),
            self.head,
            self.views,
            self.loss,
            x,
            self.n_views,
            generator=generator,
            reduction="none",
            chunk=self.chunk_size,
            lean=lean,
            arena=self._next_arena() if lean else None,
            relu_float_bytes=self._relu_float_bytes(),
        )
        if per.shape != (n,):
            raise ValueError(
                f"the contrastive loss with reduction='none' must return shape ({n},), "
                f"got {tuple(per.shape)}"
            )
        return per

    def _loss_and_grad_recompute(
        self, xr: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image loss (N,) and its input gradient with the backbone's graph one chunk at a time.

        Same draw of views, same chunks and the same head/loss call on all features as
        :func:`revlit.ssl.head.ssl_loss`, so the loss and the gradient are those of the default
        path; only the backbone's activations are alive for one chunk at a time.
        """
        net = self.backbone()
        v = self.views(xr, self.n_views, generator).contiguous(memory_format=torch.channels_last)
        parts = v.detach().split(self.chunk_size)
        with torch.no_grad():
            feats = torch.cat([net.features(p) for p in parts])
        feats.requires_grad_(True)
        per = self.loss(self.head(feats), self.n_views, reduction="none")
        (g_feats,) = torch.autograd.grad(per.sum(), feats)
        g_views = torch.empty_like(v)
        start = 0
        for p in parts:
            pc = p.detach().requires_grad_(True)
            stop = start + p.shape[0]
            ctx = (
                lean_input_grad(self._next_arena(), self._relu_float_bytes())
                if self.lean
                else contextlib.nullcontext()
            )
            with ctx:
                f = net.features(pc)
            (g_views[start:stop],) = torch.autograd.grad(f, pc, g_feats[start:stop])
            start = stop
        (grad,) = torch.autograd.grad(v, xr, g_views)
        return per, grad

    @torch.no_grad()
    def ssl_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image contrastive loss (N,) of ``x`` over one draw of fresh views, no gradient.

        Args:
            x: images in [0, 1], (N, C, H, W).
            generator: source of the views' randomness.
        """
        check_images(x)
        with frozen_eval(self.classifier, self.head, self.views):
            return self._per_image_loss(x, generator).float()

    # ----------------------------------------------------------------- the attack
    def _descend(self, x_cur: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One DEscent step (minus the ascent direction of the norm), projected onto ball ∩ box."""
        stepper = linf_step if self.norm is Norm.LINF else l2_step
        return project(self.norm, x_cur - stepper(grad, self.step_size), x, self.eps)

    def purify(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the reverse attack on a batch.

        Args:
            x: images in [0, 1], float, (N, C, H, W) (possibly adversarial). Not modified.
            generator: the only source of randomness (random start, then the views of every
                step, in that order); ``None`` uses torch's global CPU generator.

        Returns:
            ``(x_repaired, loss_per_step)``: the repaired images (N, C, H, W) in [0, 1] with
            ``x_repaired − x`` inside the ε_r-ball, detached; and the per-image contrastive loss
            (N, steps + 1) of iterate t = 0 (the start) ... steps (the last), each measured on
            that step's fresh views. :attr:`selected_step` (N,) says which iterate was returned.

        Raises:
            ValueError: ``x`` is not finite float images in [0, 1].
            RuntimeError: called under ``torch.inference_mode`` (input gradients are impossible).
        """
        check_images(x)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "the reverse attack needs input gradients but runs under torch.inference_mode; "
                "use Trainer(inference_mode=False) (revlit's CLI default)"
            )
        x = x.detach()
        n = x.shape[0]
        losses = torch.empty(n, self.steps + 1, device=x.device, dtype=torch.float32)
        if self.random_start and self.eps > 0:
            cur = random_init(self.norm, x, self.eps, generator)
        else:
            cur = x.clone()
        best_x = cur.clone() if self.select == "best" else None
        best_loss = torch.full((n,), float("inf"), device=x.device)
        best_step = torch.zeros(n, dtype=torch.long, device=x.device)
        with frozen_eval(self.classifier, self.head, self.views), torch.enable_grad():
            for t in range(self.steps + 1):
                if t < self.steps:
                    xr = cur.detach().requires_grad_(True)
                    if self.recompute:
                        per, grad = self._loss_and_grad_recompute(xr, generator)
                    else:
                        per = self._per_image_loss(xr, generator)
                        (grad,) = torch.autograd.grad(per.sum(), xr)
                else:  # the last iterate only needs its loss
                    with torch.no_grad():
                        per = self._per_image_loss(cur, generator)
                per = per.detach().float()
                losses[:, t] = per
                if best_x is not None:
                    better = per < best_loss
                    best_loss = torch.where(better, per, best_loss)
                    best_step = torch.where(better, torch.full_like(best_step, t), best_step)
                    best_x[better] = cur[better]
                if t < self.steps:
                    cur = self._descend(cur.detach(), grad, x).detach()
        if best_x is None:
            self.selected_step = torch.full((n,), self.steps, dtype=torch.long, device=x.device)
            return cur, losses
        self.selected_step = best_step
        return best_x, losses
