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
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from revlit.attacks.norms import Norm, l2_step, linf_step, project, random_init
from revlit.defenses.base import EPS_R, Defense, check_images, parse_norm
from revlit.models.base import frozen_eval
from revlit.models.fold import fold_batchnorm
from revlit.models.lean import MaskArena, lean_input_grad
from revlit.models.precision import autocast_to, check_precision, compute_dtype, full_precision
from revlit.ssl.head import ssl_loss
from revlit.utils import as_float

SELECT = ("last", "best")
#: default MiB of float ReLU outputs a lean step keeps before it makes masks (see ``relu_float_mb``)
RELU_FLOAT_MB = 384.0


class ReversePurifier(Defense):
    """Projected descent on a contrastive loss over fresh views (the reverse attack of Mao et al.).

    The settings (``norm`` ... ``relu_float_mb``) are all a YAML config or a notebook needs; the
    networks can be given here or attached later with :meth:`bind` (DefenseModule does so with
    the checkpoints it loads)::

        ReversePurifier(classifier=net, head=head)              # ready to purify
        ReversePurifier(eps="8/255", steps=20).bind(net, head)  # settings first

    Args:
        classifier: a :class:`revlit.models.Classifier` (``features(x) -> (N, feature_dim)`` for
            x in [0, 1]); only its features are used.
        head: the SSL projection head, ``head(features) -> z`` (N, out_dim).
        loss: contrastive loss callable ``loss(z, n_views, reduction="none") -> (N,)`` on
            view-major embeddings (e.g. :class:`revlit.losses.ContrastiveLoss`). It must be the
            loss the head was trained with; ``None``: what :meth:`bind` gives, else the
            authors' NT-Xent (T = 0.2).
        views: view generator ``views(x, n_views, generator) -> (n_views*N, C, H, W)``,
            view-major, differentiable w.r.t. x (e.g. :class:`revlit.ssl.views.SimCLRViews`);
            ``None``: what :meth:`bind` gives, else ``SimCLRViews()``.
        norm: ``l_inf`` (signed-gradient steps) or ``l_2`` (normalised-gradient steps).
        eps: radius ε_r of the ball (the default is the authors' Linf budget,
            :data:`revlit.defenses.base.EPS_R`); a number or a fraction such as "16/255".
        step_size: step length; a number or a fraction.
        steps: number of descent steps K.
        n_views: views per image per step V.
        select: ``last`` returns the last iterate (the authors' choice); ``best`` the iterate
            of lowest recorded loss per example (ties keep the earlier iterate).
        random_start: start from ``clip(x + u)``, u uniform in the ball.
        chunk_size: the backbone runs over at most this many views at a time; the chunks feed
            one loss and one gradient (features and gradients are bitwise the same for any
            chunking; docs/speed.md gives the fastest size measured).
        fold_bn: run the loss through a copy of the classifier with eval-mode BatchNorm folded
            into the convolutions (:func:`revlit.models.fold.fold_batchnorm`): the same function
            to float rounding, faster, but signed steps amplify rounding differences, so the
            repaired images are not those of the plain loop pixel for pixel.
        recompute: bound the memory of a step by the chunk instead of the batch (one extra
            backbone forward per step; the gradient is the same computation).
        lean: memory-lean input gradients (:func:`revlit.models.lean.lean_input_grad`): conv
            and eval BatchNorm save nothing for the backward pass and ReLUs a 1-byte mask; the
            gradient is bitwise that of the default path, so the repaired images are identical.
        relu_float_mb: with ``lean``, MiB of ReLU outputs a step keeps as floats before it
            switches to masks (faster, 4x a mask's memory; 0: masks only; the same gradients).
        precision: the dtype the backbone and head compute in (:mod:`revlit.models.precision`):
            ``None`` follows the surrounding autocast (Lightning's ``--trainer.precision``, or
            a ``torch.autocast`` around the call; float32 without one), ``"32"``, ``"bf16"``,
            ``"16"``, or ``"auto"`` (bf16 where the hardware has it). Whatever it is, the views,
            the loss, the step, the projection onto the ε_r-ball and the [0, 1] box run in
            float32 with autocast off.

    ``purify`` computes gradients w.r.t. the input only (``torch.autograd.grad``), with every
    module in eval mode and its parameters frozen for the duration (modes and ``requires_grad``
    flags are restored afterwards), so parameters and BatchNorm buffers stay bit-identical.
    All randomness (start, views) comes from the ``generator`` argument.
    """

    method = "reverse"
    needs_grad = True

    def __init__(
        self,
        classifier: nn.Module | None = None,
        head: nn.Module | None = None,
        loss: nn.Module | None = None,
        views: nn.Module | None = None,
        norm: Norm | str = Norm.LINF,
        eps: float | str = EPS_R,
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
        precision: str | None = None,
    ) -> None:
        self.classifier, self.head, self.loss, self.views = None, None, loss, views
        self.fold_bn, self.recompute, self.lean = bool(fold_bn), bool(recompute), bool(lean)
        self._folded: tuple[tuple, nn.Module] | None = None
        # the lean path's ReLU masks: one set of blocks, handed out again at every step
        self._arena = MaskArena(reuse=True)
        self.norm = parse_norm(norm)
        self.eps = as_float(eps, "eps")
        self.step_size = as_float(step_size, "step_size")
        if not (self.eps > 0 and self.step_size > 0):
            raise ValueError(
                f"eps and step_size must be > 0 (else nothing is reversed), got {self.eps}, "
                f"{self.step_size}"
            )
        if int(steps) != steps or steps < 1:
            raise ValueError(
                f"steps must be an integer >= 1 (else nothing is reversed), got {steps}"
            )
        if int(n_views) != n_views or n_views < 2:
            raise ValueError(f"n_views must be an integer >= 2 (a contrastive loss), got {n_views}")
        if select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got '{select}'")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not relu_float_mb >= 0:
            raise ValueError(f"relu_float_mb must be >= 0, got {relu_float_mb}")
        self.relu_float_mb = float(relu_float_mb)
        self.precision = check_precision(precision)
        self.steps, self.n_views, self.select = int(steps), int(n_views), select
        self.random_start, self.chunk_size = bool(random_start), int(chunk_size)
        #: per example, the iterate ``purify`` returned (0 = start, ``steps`` = last); set by purify.
        self.selected_step: torch.Tensor | None = None
        if classifier is not None or head is not None:
            self.bind(classifier, head)

    def bind(self, classifier, head, loss=None, views=None) -> ReversePurifier:
        """Attach the frozen classifier and SSL head; ``loss``/``views`` fill only what is unset.

        A loss or views given at construction (e.g. from YAML) wins over the bound ones, which are
        those the head was trained with. Returns ``self``.
        """
        if classifier is None or head is None:
            raise ValueError("ReversePurifier needs both a classifier and an SSL head")
        if self.loss is None or self.views is None:
            from revlit.losses import make_loss
            from revlit.ssl.head import HEAD_DEFAULTS
            from revlit.ssl.views import SimCLRViews

            rec = HEAD_DEFAULTS
            if self.loss is None:
                self.loss = loss or make_loss(rec["loss"], rec["temperature"])
            if self.views is None:
                self.views = views or SimCLRViews(mode=rec["view_mode"])
        self.classifier, self.head, self._folded = classifier, head, None
        return self

    def _require_bound(self) -> None:
        if self.classifier is None or self.head is None:
            raise RuntimeError(
                "ReversePurifier has no networks: construct it with classifier= and head= or "
                "call bind(classifier, head)"
            )

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
            "precision": self.precision,
        }

    def passes_per_image(self) -> int:
        """Backbone passes of a defended prediction per image: :meth:`view_passes` + 1 forward
        to classify (the diagnostic SSL losses are not counted)."""
        return sum(self.view_passes().values()) + 1

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
        self._require_bound()
        amp = compute_dtype(self.precision, x.device)
        with frozen_eval(self.classifier, self.head, self.views), autocast_to(amp, x.device):
            return self._per_image_loss(x, generator).float()

    # ----------------------------------------------------------------- the attack
    def _descend(self, x_cur: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One DEscent step (minus the ascent direction of the norm), projected onto ball ∩ box."""
        stepper = linf_step if self.norm is Norm.LINF else l2_step
        return project(self.norm, x_cur - stepper(grad, self.step_size), x, self.eps)

    def defend(self, x, generator=None, trace=None):
        """:class:`revlit.defenses.base.Defense`'s interface: ``({steps: x_def, t: iterate t for t
        in trace}, {"ssl_steps": (N, steps + 1), "selected_step": (N,)})``.

        ``trace`` needs ``select="last"``: the iterate after t steps of a K-step run is exactly
        what a t-step run returns (same start, same views: the generator is consumed in the same
        order), so one run gives the whole cost frontier over K.
        """
        x_def, losses, snaps = self._run(x, generator, trace or ())
        return {**snaps, self.steps: x_def}, {
            "ssl_steps": losses,
            "selected_step": self.selected_step,
        }

    def purify(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the reverse attack on a batch.

        Args:
            x: images in [0, 1], float, (N, C, H, W) (possibly adversarial). Not modified.
            generator: the only source of randomness (random start, then the views of every
                step, in that order); ``None`` uses torch's global CPU generator; a list of
                per-image generators makes every image independent of its batch-mates.

        Returns:
            ``(x_repaired, loss_per_step)``: the repaired images (N, C, H, W) in [0, 1] with
            ``x_repaired − x`` inside the ε_r-ball, detached; and the per-image contrastive loss
            (N, steps + 1) of iterate t = 0 (the start) ... steps (the last), each measured on
            that step's fresh views. :attr:`selected_step` (N,) says which iterate was returned.

        Raises:
            ValueError: ``x`` is not finite float images in [0, 1].
            RuntimeError: called under ``torch.inference_mode`` (input gradients are impossible),
                or without networks.
        """
        x_def, losses, _ = self._run(x, generator, ())
        return x_def, losses

    def _run(
        self, x: torch.Tensor, generator, trace: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The descent; also returns the iterates after t steps for t in ``trace``."""
        want = {int(t) for t in trace}
        if want and (self.select != "last" or min(want) < 0 or max(want) > self.steps):
            raise ValueError(f"trace needs select='last' and steps in [0, {self.steps}]")
        self._require_bound()
        snaps: dict[int, torch.Tensor] = {}
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
        amp = compute_dtype(self.precision, x.device)  # before autocast is switched off below
        with (
            frozen_eval(self.classifier, self.head, self.views),
            torch.enable_grad(),
            full_precision(x.device),
        ):
            for t in range(self.steps + 1):
                if t < self.steps:
                    xr = cur.detach().requires_grad_(True)
                    with autocast_to(amp, x.device):
                        if self.recompute:
                            per, grad = self._loss_and_grad_recompute(xr, generator)
                        else:
                            per = self._per_image_loss(xr, generator)
                            (grad,) = torch.autograd.grad(per.sum(), xr)
                else:  # the last iterate only needs its loss
                    with torch.no_grad(), autocast_to(amp, x.device):
                        per = self._per_image_loss(cur, generator)
                per = per.detach().float()
                losses[:, t] = per
                if t in want:
                    snaps[t] = cur.detach().clone()
                if best_x is not None:
                    better = per < best_loss
                    best_loss = torch.where(better, per, best_loss)
                    best_step = torch.where(better, torch.full_like(best_step, t), best_step)
                    best_x[better] = cur[better]
                if t < self.steps:
                    cur = self._descend(cur.detach(), grad, x).detach()
        if best_x is None:
            self.selected_step = torch.full((n,), self.steps, dtype=torch.long, device=x.device)
            return cur, losses, snaps
        self.selected_step = best_step
        return best_x, losses, snaps


#: the reverse attack's settings and their defaults, read from :class:`ReversePurifier`'s
#: signature (the one place they are written); the networks are not settings
SETTINGS = {
    name: p.default
    for name, p in inspect.signature(ReversePurifier).parameters.items()
    if name not in ("classifier", "head", "loss", "views")
}
