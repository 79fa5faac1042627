"""Threat models: one ``Norm`` enum for Linf / L2 / L1 used everywhere in revlit.

Each norm has a steepest-ascent step, a random start and a projection onto (ε-ball ∩ [0,1] box).
Images are [0,1] floats, NCHW (any memory format); perturbations have the same shape. Everything
here is vectorised over the batch (no per-example Python loops) and framework-free.

- **Linf**: signed-gradient step; the projection clips to the ε-box and to [0,1] (exact: the
  intersection of two boxes is a box).
- **L2**: step along the L2-normalised gradient; projection = rescale into the L2 ball, then clip to
  [0,1]. Clipping only shrinks coordinates, so the result stays in the ball (feasible, the standard
  PGD-L2 projection; not the exact Euclidean projection onto ball ∩ box).
- **L1**: a *sparse* step (SLIDE, Tramèr & Boneh 2019; the L1-APGD step of Croce & Hein 2021):
  only the top-k fraction of the coordinates by |gradient| move, each by ``step/k`` in the sign of
  the gradient, and coordinates that sit on a face of the [0,1] box with the gradient pointing out
  of it are not counted. The projection is the *exact* Euclidean projection onto
  {‖δ‖₁ ≤ ε} ∩ {x+δ ∈ [0,1]} (Croce & Hein 2021, "Mind the box", Lemma 1/2): the solution is the
  box-clipped soft-threshold ``clip(sign(z)·max(|z|−λ, 0), −x, 1−x)`` with the smallest λ ≥ 0 that
  brings the L1 norm to ≤ ε. λ is found exactly (no bisection) by sorting the 2d breakpoints of the
  piecewise-linear function λ ↦ ‖δ(λ)‖₁, per example, vectorised over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch

from revlit.seeding import per_image_generators

# Default fraction of the coordinates the sparse L1 step moves (see ``l1_step``). SLIDE's default
# (cleverhans ``grad_sparsity=99``) is the top 1 %.
L1_TOPK_DEFAULT = 0.01


class Norm(str, Enum):
    """The threat models of revlit; values are the command-line spellings (``--norm l_inf``)."""

    LINF = "l_inf"
    L2 = "l_2"
    L1 = "l_1"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        """Accept ``l_inf``/``linf``/``Linf``/``inf``, ``l_2``/``l2``, ``l_1``/``l1``.

        Raises:
            ValueError: one line naming the unknown norm and the known ones.
        """
        if isinstance(value, Norm):
            return value
        key = str(value).strip().lower().replace("-", "_")
        aliases = {
            "l_inf": cls.LINF, "linf": cls.LINF, "inf": cls.LINF,
            "l_2": cls.L2, "l2": cls.L2, "2": cls.L2,
            "l_1": cls.L1, "l1": cls.L1, "1": cls.L1,
        }  # fmt: skip
        if key not in aliases:
            raise ValueError(f"unknown norm '{value}'; use one of l_inf, l_2, l_1")
        return aliases[key]

    def __str__(self) -> str:
        return self.value


# Default budgets; the default step is ε/4 for every norm (see ``default_step_size``).
DEFAULT_EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5, Norm.L1: 12.0}


def default_step_size(norm: Norm | str, eps: float) -> float:
    """The default step of every norm: ε/4, whatever the number of iterations.

    - Linf: 2/255 at ε = 8/255 (Madry et al.'s CIFAR-10 setting).
    - L2: 0.125 at ε = 0.5: four unimpeded steps reach the sphere, so 5, 10 and 50 iterations all
      end on it (``python -m revlit.attacks.table`` reports the share within 1 % of ε).
    - L1: 3 at ε = 12: the sparse step (top 1 % of the coordinates) reaches the L1 sphere in a few
      iterations, and the exact projection then keeps the iterate on it. Measured on the robust
      ResNet-20 (100 images, 10 iterations), ε/4, ε/2 and ε gave the same accuracy within 2 images
      and a top-1 % step beat 2 %, 5 % and 10 %; every final perturbation was on the sphere.
    """
    Norm.parse(norm)
    return eps / 4


def lp_norm(delta: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """Per-example norm of a perturbation (N, ...) -> (N,)."""
    norm = Norm.parse(norm)
    d = delta.reshape(len(delta), -1)
    if norm is Norm.LINF:
        return d.abs().amax(1)
    if norm is Norm.L2:
        return d.norm(p=2, dim=1)
    return d.abs().sum(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------- Linf
def linf_step(grad: torch.Tensor, step: float) -> torch.Tensor:
    """Signed-gradient ascent step of size ``step`` (Linf steepest ascent)."""
    return step * grad.sign()


def linf_project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto {‖x_adv − x‖∞ ≤ eps} ∩ [0,1]^d (exact: both are boxes)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------- L2
def l2_step(grad: torch.Tensor, step: float) -> torch.Tensor:
    """Ascent step of L2 length ``step`` along the normalised gradient (zero gradient: no move)."""
    n = grad.reshape(len(grad), -1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad * _bcast(step / n, grad)


def l2_project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rescale ``x_adv − x`` into the L2 ball of radius ``eps``, then clip ``x_adv`` to [0,1]."""
    delta = x_adv - x
    n = delta.reshape(len(delta), -1).norm(p=2, dim=1)
    factor = torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
    return (x + delta * _bcast(factor, delta)).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------- L1
def l1_movable(x_adv: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Coordinates that can still move in the gradient's sign inside [0,1] (bool, like x)."""
    return ~(((x_adv <= 0.0) & (grad < 0)) | ((x_adv >= 1.0) & (grad > 0)))


def l1_step(
    grad: torch.Tensor,
    step: float,
    x_adv: torch.Tensor | None = None,
    topk: float = L1_TOPK_DEFAULT,
) -> torch.Tensor:
    """Sparse L1 ascent step (SLIDE / L1-APGD) of L1 length ``step``.

    Per example, the ``k = ceil(topk · d)`` coordinates with the largest |gradient| among those that
    can still move inside [0,1] (when ``x_adv`` is given) each move by ``step / k`` in the sign of
    the gradient. Ties at the k-th value may add a few coordinates; the step's L1 length is exactly
    ``step`` whenever a coordinate can move, else the step is zero.
    """
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"L1 top-k fraction must be in (0, 1], got {topk}")
    n = len(grad)
    score = grad.abs()
    if x_adv is not None:
        score = score * l1_movable(x_adv, grad)
    flat = score.reshape(n, -1)
    d = flat.shape[1]
    k = max(1, min(d, math.ceil(topk * d)))
    thr = flat.topk(k, dim=1, sorted=False).values.amin(1)  # k-th largest score, (N,)
    sel = (score >= _bcast(thr, score)) & (score > 0)
    e = grad.sign() * sel
    cnt = sel.reshape(n, -1).sum(1).clamp_min(1).to(grad.dtype)
    return e * _bcast(step / cnt, e)


def l1_box_threshold(
    z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float
) -> torch.Tensor:
    """The exact λ ≥ 0 of the projection of ``z`` onto {‖δ‖₁ ≤ ε, lo ≤ δ ≤ hi} (lo ≤ 0 ≤ hi).

    With a_i = |z_i| and cap b_i (``hi_i`` if z_i ≥ 0 else ``−lo_i``), ‖δ(λ)‖₁ =
    Σ_i min(max(a_i − λ, 0), b_i) is continuous, non-increasing and piecewise linear with
    breakpoints a_i − b_i (the term starts to fall: slope −1) and a_i (it reaches 0: slope +1).
    Sorting the 2d breakpoints and accumulating gives ‖δ‖₁ at every breakpoint; λ is the linear
    interpolation in the interval where it crosses ε. Computed in float64.

    Args:
        z, lo, hi: (N, d). Returns: λ, (N,) in z's dtype (0 where the clipped z already fits).
    """
    z64, lo64, hi64 = z.double(), lo.double(), hi.double()
    a = z64.abs()
    b = torch.where(z64 >= 0, hi64, -lo64).clamp_min(0.0)
    at_zero = torch.minimum(a, b).sum(1)  # ‖clip(z)‖₁, i.e. λ = 0
    bp = torch.cat([a - b, a], dim=1)  # (N, 2d)
    ds = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1)
    bp, order = bp.sort(dim=1)
    ds = ds.gather(1, order)
    slope = ds.cumsum(1)  # slope of f on [bp_j, bp_{j+1}]
    gaps = bp.diff(dim=1)
    # f(bp_0) = Σ b (every term capped); f(bp_{j+1}) = f(bp_j) + slope_j · gap_j
    f = torch.cat(
        [b.sum(1, keepdim=True), b.sum(1, keepdim=True) + (slope[:, :-1] * gaps).cumsum(1)], 1
    )
    # first breakpoint where f <= eps (exists: f(last) = 0 <= eps)
    below = f <= eps
    j = below.to(torch.int8).argmax(1).clamp_min(1)  # crossing in [bp_{j-1}, bp_j]
    jm = (j - 1).unsqueeze(1)
    f_prev = f.gather(1, jm).squeeze(1)
    t_prev = bp.gather(1, jm).squeeze(1)
    s_prev = slope.gather(1, jm).squeeze(1)
    lam = t_prev + (f_prev - eps) / (-s_prev).clamp_min(1.0)
    lam = torch.where(at_zero <= eps, torch.zeros_like(lam), lam.clamp_min(0.0))
    return lam.to(z.dtype)


def project_l1_box(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact Euclidean projection of ``delta`` onto {‖δ‖₁ ≤ ε} ∩ {x + δ ∈ [0,1]}.

    Croce & Hein (ICCV 2021, "Mind the box: l1-APGD", Lemma 2): δ* = clip(soft(δ, λ), −x, 1−x) with
    the exact threshold of :func:`l1_box_threshold`. A last rescale (by at most a float rounding
    error, towards 0, which stays in the box) guarantees ‖δ*‖₁ ≤ ε.

    Args:
        delta: perturbations (N, ...); x: clean images in [0,1], same shape.
    Returns:
        The projected perturbation, same shape and memory format as ``delta``.
    """
    n = len(delta)
    lo, hi = -x, 1.0 - x
    lam = l1_box_threshold(delta.reshape(n, -1), lo.reshape(n, -1), hi.reshape(n, -1), eps)
    out = delta.sign() * (delta.abs() - _bcast(lam, delta)).clamp_min(0.0)
    out = torch.max(torch.min(out, hi), lo)
    l1 = out.reshape(n, -1).abs().sum(1)
    factor = torch.where(l1 > eps, eps / l1.clamp_min(1e-30), torch.ones_like(l1))
    return out * _bcast(factor, out)


def l1_project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto {‖x_adv − x‖₁ ≤ eps} ∩ [0,1]^d exactly (see :func:`project_l1_box`)."""
    return (x + project_l1_box(x_adv - x, x, eps)).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------- dispatchers
def check_eps(eps: float) -> float:
    """ε as a float; one-line ValueError if negative or not finite."""
    e = float(eps)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return e


def project(norm: Norm | str, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project adversarial images onto the ε-ball of ``norm`` around ``x`` ∩ [0,1]."""
    norm, eps = Norm.parse(norm), check_eps(eps)
    if norm is Norm.LINF:
        return linf_project(x_adv, x, eps)
    if norm is Norm.L2:
        return l2_project(x_adv, x, eps)
    return l1_project(x_adv, x, eps)


def step(
    norm: Norm | str,
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    l1_topk: float = L1_TOPK_DEFAULT,
) -> torch.Tensor:
    """One ascent step (before projection): ``x_adv + step`` in the steepest direction of ``norm``."""
    norm = Norm.parse(norm)
    if norm is Norm.LINF:
        return x_adv + linf_step(grad, step_size)
    if norm is Norm.L2:
        return x_adv + l2_step(grad, step_size)
    return x_adv + l1_step(grad, step_size, x_adv=x_adv, topk=l1_topk)


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(
    kind: str, shape: tuple[int, ...], generator: Generators = None, device=None, dtype=None
) -> torch.Tensor:
    """Noise of ``shape`` = (N, ...) drawn on the CPU, then moved to ``device``.

    ``kind``: ``rand`` (uniform [0,1)), ``randn`` (standard normal) or ``sign`` (±1).
    ``generator`` is one ``torch.Generator`` for the batch, ``None`` (the global one), or a sequence
    of N generators, one per example: row i then depends on generator i only, so a result does not
    depend on how the examples are batched or sharded across ranks.
    """

    def one(shp, g):
        if kind == "rand":
            return torch.rand(shp, generator=g)
        if kind == "randn":
            return torch.randn(shp, generator=g)
        if kind == "sign":
            return torch.randint(0, 2, shp, generator=g).float().mul_(2).sub_(1)
        raise ValueError(f"unknown noise kind '{kind}'")

    if generator is None or isinstance(generator, torch.Generator):
        out = one(tuple(shape), generator)
    else:
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for {shape[0]} examples")
        out = (
            torch.stack([one(tuple(shape[1:]), g) for g in gens])
            if gens
            else one(tuple(shape), None)
        )
    return out.to(device=device, dtype=dtype or torch.float32)


#: one CPU generator per example, seeded with ``seed * 2**24 + index`` (see revlit.seeding)
example_generators = per_image_generators


def random_init(
    norm: Norm | str, x: torch.Tensor, eps: float, generator: Generators = None
) -> torch.Tensor:
    """A random starting point inside (ε-ball ∩ [0,1]) around ``x``.

    - Linf: uniform in the ε-box, clipped to [0,1].
    - L2: uniform in the ε-ball (Gaussian direction, radius ε·U^(1/d)), clipped to [0,1].
    - L1: uniform in the ε-ball (random signs times a Dirichlet(1,…,1) point of the (d+1)-simplex
      scaled by ε), projected exactly onto ball ∩ box.

    The noise is drawn on the CPU (see :func:`draw_noise`: one generator, or one per example) and
    moved to ``x``'s device, so a seed gives the same start on every device.
    """
    norm, eps = Norm.parse(norm), check_eps(eps)
    n, d = len(x), x[0].numel()
    kw = {"generator": generator, "device": x.device, "dtype": x.dtype}
    if norm is Norm.LINF:
        u = draw_noise("rand", (n, *x.shape[1:]), **kw) * 2 - 1
        return (x + eps * u).clamp(0.0, 1.0)
    if norm is Norm.L2:
        # one draw of d+1 numbers per example: d for the direction, 1 for the radius
        g = draw_noise("randn", (n, d + 1), **kw)
        r = torch.special.ndtr(g[:, d].double()).pow(1.0 / d).to(x.dtype) * eps  # U^(1/d)·ε
        g = g[:, :d] / g[:, :d].norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (x + (g * r[:, None]).reshape(x.shape)).clamp(0.0, 1.0)
    u = draw_noise("rand", (n, 2 * d + 1), **kw)
    e = -torch.log(u[:, : d + 1].clamp_min(1e-12))  # Exp(1)
    w = e[:, :d] / e.sum(1, keepdim=True)
    s = torch.where(u[:, d + 1 :] < 0.5, -1.0, 1.0).to(x.dtype)
    delta = (eps * w * s).reshape(x.shape)
    return (x + project_l1_box(delta, x, eps)).clamp(0.0, 1.0)
