"""Differentiable SimCLR views on batched tensors (Mao et al., ICCV 2021, §3 / authors' code).

The reverse-attack defense of Mao et al. ("Adversarial Attacks are Reversible with Natural
Supervision", ICCV 2021) measures a contrastive loss between random *views* of an image and takes
gradient steps on the input pixels to lower it, so every op here is differentiable w.r.t. the
images. The authors' views for CIFAR-10 are the SimCLR ones without blur::

    RandomResizedCrop(32) -> RandomHorizontalFlip(0.5)
    -> RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.8) -> RandomGrayscale(0.2)

which they applied with torchvision 0.8 to whole batch tensors, i.e. ONE random draw per call =
per view, shared by every image of the batch (``mode="shared"``). ``mode="per_sample"`` draws
independent parameters for every image (the usual SimCLR data-loader behaviour). Both are
implemented here on batches without a per-image python loop:

* crop + resize + flip: one affine sampling grid per output image (:func:`crop_grid`, the grid
  of ``F.affine_grid`` without its GEMM) + ``F.grid_sample`` (bilinear, ``align_corners=False``,
  border padding). For the integer crop boxes of torchvision's ``RandomResizedCrop`` this
  equals ``F.interpolate(crop, size, mode="bilinear", align_corners=False)`` (torchvision 0.8's
  tensor resize, no antialiasing) everywhere except the outermost ring of output pixels when
  upsampling: there the sampling point falls up to half a pixel
  outside the box, and we read the real neighbouring pixel of the image where ``interpolate``
  replicates the crop's edge (measured: interior identical to 1e-7).
* colour jitter: brightness, contrast, saturation and hue with per-image factors broadcast over the
  pixels, in a random order per draw (torchvision's ``ColorJitter`` permutes the four ops). Rows
  are grouped by their order (at most 24 groups + one "no jitter" group) so the order can differ
  between images in ``per_sample`` mode and between views in ``shared`` mode. Brightness,
  contrast and saturation clamp to [0, 1] as torchvision's ``_blend`` does; the hue shift goes
  through a differentiable RGB -> HSV -> RGB round trip (torchvision v2's hue is not
  differentiable w.r.t. the images).
* grayscale: luminance 0.299 R + 0.587 G + 0.114 B copied to the three channels.

Randomness: every parameter is drawn on the CPU from the given ``torch.Generator`` (or torch's
global CPU generator when ``None``) in a fixed order, then moved to the images' device, so a seeded
generator gives the same views on any device and for the clean and the attacked version of a batch.
A sequence of N generators (one per image) may be given instead: image i's views then come from
generator i alone, in either mode, so they do not depend on which other images share the batch
(the batch-independent purifier of :mod:`revlit.defenses.bank` relies on this).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revlit.models.precision import full_precision

MODES = ("shared", "per_sample")
#: at most this many runs of equal jitter order (or grayscale flag) in row order: process the runs
#: as slices (no gathers, no full-size ``where``); shared mode has one run per view
MAX_RUNS = 32
LUMA = (0.299, 0.587, 0.114)
# The 24 orders of (brightness, contrast, saturation, hue); row k of this table is order k.
_ORDERS = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.long)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luminance (N, 1, H, W) of RGB images (N, 3, H, W), weights 0.299 / 0.587 / 0.114."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _bcast(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def clamp01(x: torch.Tensor) -> torch.Tensor:
    """``x.clamp(0, 1)``: the same values and the same gradient, bit for bit, ~10x cheaper backward.

    ``hardtanh(x, 0, 1)`` is the clamp; its backward is one vectorised kernel that passes the
    gradient where 0 < x < 1, which is exactly where autograd's clamp backward passes it (its
    ``where`` over two comparisons costs ~20 ms per 2048 views on 2 CPU threads, against ~1.6).
    They differ only on NaN inputs, which images never hold (tests check the bits).
    """
    return F.hardtanh(x, 0.0, 1.0)


def crop_grid(
    sx: torch.Tensor, tx: torch.Tensor, sy: torch.Tensor, ty: torch.Tensor, size: int
) -> torch.Tensor:
    """``F.affine_grid`` of the axis-aligned maps ``(sx·u + tx, sy·v + ty)``, without its GEMM.

    Args:
        sx, tx, sy, ty: (M,) scale and shift of each output image's x and y (normalised [-1, 1]
            coordinates; a negative ``sx`` flips).
        size: output side S.

    Returns:
        (M, S, S, 2) sampling grid for ``F.grid_sample(..., align_corners=False)``: the one
        ``F.affine_grid([[sx, 0, tx], [0, sy, ty]], align_corners=False)`` gives, to float
        rounding (its batched GEMM with an inner dimension of 3 cost ~3 ms per 512 views on 2
        CPU threads, this ~0.4).
    """
    base = (torch.arange(size, device=sx.device, dtype=sx.dtype) * 2 + 1) / size - 1
    gx = sx[:, None] * base + tx[:, None]  # (M, S): x depends on the column only
    gy = sy[:, None] * base + ty[:, None]  # (M, S): y on the row only
    gx, gy = torch.broadcast_tensors(gx[:, None, :], gy[:, :, None])
    return torch.stack((gx, gy), dim=-1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(factor * x, 0, 1)`` with one factor per image (factor shape (N,))."""
    return clamp01(x * _bcast(factor))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its grayscale version (torchvision semantics), clamp."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(factor)
    return clamp01(f * x + (1.0 - f) * mean)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grayscale version (torchvision semantics), clamp."""
    f = _bcast(factor)
    return clamp01(f * x + (1.0 - f) * grayscale(x))


def _tent_slope(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d clamp(m, 0, 1) / dk for m = min(k, 4 - k): +1 where 0 < k < 1 (m = k), -1 where
    3 < k < 4 (m = 4 - k, exact there), else 0."""
    return torch.ops.aten.hardtanh_backward(torch.sign(2.0 - k), m, 0.0, 1.0)


class _Tent(torch.autograd.Function):
    """``clamp(min(k, 4 - k), 0, 1)`` whose backward is one product by a saved slope in {-1, 0, 1}."""

    @staticmethod
    def forward(ctx, k):
        m = torch.minimum(k, 4.0 - k)
        ctx.save_for_backward(_tent_slope(k, m))
        return clamp01(m)

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope


def tent(k: torch.Tensor) -> torch.Tensor:
    """``clamp(minimum(k, 4 - k), 0, 1)`` (the hue-to-RGB weight), same values, same gradient values.

    Autograd's backward of that expression costs ~10 ms per 2048 views (``minimum``'s backward
    splits ties with ``where`` and ``masked_fill``); here it is one product. Where the two
    branches tie (k = 2) the clamp blocks the gradient anyway, so the values agree everywhere
    (a blocked entry may be -0 instead of +0; tests check the values).
    """
    if not (torch.is_grad_enabled() and k.requires_grad):
        return clamp01(torch.minimum(k, 4.0 - k))
    return _Tent.apply(k)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) in [0, 1] -> HSV with every channel in [0, 1] (hue as a fraction of a turn).

    Differentiable almost everywhere; grey pixels (max == min) get hue 0 and saturation 0 with a
    finite gradient (the divisions use 1 instead of 0 there, as torchvision does).
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    grey = delta == 0
    one = torch.ones_like(maxc)
    s = delta / torch.where(maxc == 0, one, maxc)
    d = torch.where(grey, one, delta)
    # Sector formula: which channel is the max decides the offset (0, 2, 4 sixths of a turn).
    h_r = (g - b) / d
    h_g = 2.0 + (b - r) / d
    h_b = 4.0 + (r - g) / d
    h = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (N, 3, H, W) with channels in [0, 1] -> RGB in [0, 1].

    Uses the closed form ``c_n = v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6`` for ``n = 5, 3, 1`` (R, G, B): piecewise linear in h, so it is
    differentiable almost everywhere and needs no sector masks.
    """
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor((5.0, 3.0, 1.0), device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * tent(k)


def adjust_hue_reference(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`adjust_hue` as the plain composition ``hsv_to_rgb(rotate(rgb_to_hsv(x)))``.

    Same values and gradient values as :func:`adjust_hue` (tests check it), ~3x slower forward
    + backward; kept as the readable definition.
    """
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0:1] + _bcast(shift), 1.0)
    return hsv_to_rgb(torch.cat((h, hsv[:, 1:]), dim=1))


def _first_of(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, ref: torch.Tensor):
    """0/1 float planes: which of a, b, c is the first to equal ``ref`` (one of their max/min).

    ``1 - sign(|ref - a|)`` is 1 exactly where a == ref (a float difference is 0 only there);
    the order is that of ``max(dim=1)`` / ``min(dim=1)``'s index on ties and of the hue's
    sector formula (red before green before blue). Arithmetic instead of ``where``: ~20x
    faster on CPU.
    """
    fa = 1.0 - torch.sign((ref - a).abs_())
    fb = (1.0 - fa) * (1.0 - torch.sign((ref - b).abs_()))
    return fa, fb, (1.0 - fa) - fb


class _AdjustHue(torch.autograd.Function):
    """The hue rotation of :func:`adjust_hue_reference` in one node, with a hand-derived backward.

    Forward: the same float operations on the same values (``where`` selections replaced by
    products with exact 0/1 masks, ``max(dim=1)`` by ``maximum``), so the output has the same
    bits. Backward: the chain rule of the reference composition, term by term, in the order
    autograd accumulates it (only ``g_maxc`` has three non-zero terms; the order is checked by
    the tests), so the gradient has the same values (an entry that is zero may carry the other
    sign).
    """

    @staticmethod
    def forward(ctx, x, shift):
        r, g, b = x.unbind(1)
        maxc = torch.maximum(torch.maximum(r, g), b)
        minc = torch.minimum(torch.minimum(r, g), b)
        delta = maxc - minc
        ng = torch.sign(delta)  # 1, or 0 for grey pixels (delta >= 0)
        d = delta + (1.0 - ng)  # where(grey, 1, delta)
        nzm = torch.sign(maxc).abs_()
        mz = maxc + (1.0 - nzm)  # where(maxc == 0, 1, maxc)
        s = delta / mz
        q_r, q_g, q_b = (g - b) / d, (b - r) / d, (r - g) / d
        fr, fg, fb = _first_of(r, g, b, maxc)  # the sector, and max(dim=1)'s index
        h1 = (q_r * fr + (2.0 + q_g) * fg) + (4.0 + q_b) * fb
        h = torch.remainder((h1 * ng) / 6.0, 1.0)
        hp = torch.remainder(h.unsqueeze(1) + _bcast(shift), 1.0)
        n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        k = torch.remainder(n + 6.0 * hp, 6.0)
        m = torch.minimum(k, 4.0 - k)
        w = clamp01(m)
        v, s1 = maxc.unsqueeze(1), s.unsqueeze(1)
        vs = v * s1
        out = v - vs * w
        if ctx.needs_input_grad[0]:
            slope = _tent_slope(k, m)
            q_sel = (q_r * fr + q_g * fg) + q_b * fb
            mr, mg, mb = _first_of(r, g, b, minc)  # min(dim=1)'s index
            ctx.save_for_backward(
                w, vs, slope, s1, v, ng, nzm, d, mz, q_sel, fr, fg, fb, mr, mg, mb
            )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):
        w, vs, slope, s1, v, ng, nzm, d, mz, q_sel, fr, fg, fb, mr, mg, mb = ctx.saved_tensors
        # hsv_to_rgb: out = v - (v * s) * w(k), k = (n + 6 h') mod 6, h' = (h + shift) mod 1
        neg = -grad
        g_vs = (neg * w).sum(1, keepdim=True)
        g_h = ((neg * vs) * slope).sum(1) * 6.0
        g_v = grad.sum(1) + (g_vs * s1).squeeze(1)
        g_s = (g_vs * v).squeeze(1)
        # rgb_to_hsv: h = (sector(q) * [not grey] / 6) mod 1, s = delta / mz, v = maxc
        g_h1 = (g_h / 6.0) * ng
        g_q = g_h1 / d  # the selected sector's numerator gradient (others are 0)
        g_d = -g_h1 * (q_sel / d)
        g_delta = g_s / mz + g_d * ng
        g_mz = (-g_s * (s1.squeeze(1) / mz)) * nzm
        g_maxc = (g_v + g_mz) + g_delta
        g_minc = -g_delta
        gn_r, gn_g, gn_b = g_q * fr, g_q * fg, g_q * fb  # numerators g - b, b - r, r - g
        g_r = (-gn_g + gn_b) + g_maxc * fr + g_minc * mr
        g_g = (gn_r + -gn_b) + g_maxc * fg + g_minc * mg
        g_b = (-gn_r + gn_g) + g_maxc * fb + g_minc * mb
        return torch.stack((g_r, g_g, g_b), dim=1), None


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift`` (N,) turns (in [-0.5, 0.5]), differentiably.

    x: RGB images (N, 3, H, W) in [0, 1]. The values and gradient values of
    :func:`adjust_hue_reference` (RGB -> HSV -> rotate -> RGB), ~3x faster on CPU.
    """
    return _AdjustHue.apply(x, shift.to(device=x.device, dtype=x.dtype))


class SimCLRViews(nn.Module):
    """Random SimCLR views (crop-resize, flip, colour jitter, grayscale) of a batch, differentiable.

    Defaults are the views of Mao et al. (ICCV 2021) for CIFAR-10: ``RandomResizedCrop(32,
    scale=(0.08, 1), ratio=(3/4, 4/3))``, horizontal flip p=0.5, ``ColorJitter(0.8, 0.8, 0.8, 0.2)``
    applied with p=0.8, ``RandomGrayscale(0.2)``, no blur.

    Args:
        size: output side length (square views).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (w / h), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths; factors are drawn uniformly from
            [max(0, 1 - s), 1 + s] for the first three and [-hue, hue] for the hue (hue <= 0.5).
        jitter_p: probability that the colour jitter is applied at all.
        gray_p: probability of converting to grayscale.
        mode: ``"shared"`` (one draw per view for the whole batch, as the authors' batch-tensor
            torchvision code) or ``"per_sample"`` (independent draws per image and view).

    The module has no parameters. ``forward(x, n_views, generator)`` takes images in [0, 1] of
    shape (N, 3, H, W) and returns views in [0, 1] of shape (n_views * N, 3, size, size),
    VIEW-MAJOR: row ``v * N + i`` is view ``v`` of image ``i``.
    """

    def __init__(
        self,
        size: int = 32,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.8, 0.8, 0.8, 0.2),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        mode: str = "shared",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"views mode must be one of {', '.join(MODES)}, got '{mode}'")
        if size < 1:
            raise ValueError(f"views size must be >= 1, got {size}")
        scale, ratio, jitter = tuple(map(float, scale)), tuple(map(float, ratio)), tuple(jitter)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"views scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"views ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "views jitter must be (brightness, contrast, saturation, hue) >= 0 with "
                f"hue <= 0.5, got {jitter}"
            )
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"views {name} must be in [0, 1], got {p}")
        self.size, self.scale, self.ratio = int(size), scale, ratio
        self.flip_p, self.jitter, self.jitter_p, self.gray_p = (
            flip_p,
            tuple(map(float, jitter)),
            jitter_p,
            gray_p,
        )
        self.mode = mode

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, flip_p={self.flip_p}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, gray_p={self.gray_p}, mode={self.mode}"
        )

    # ------------------------------------------------------------------ parameters
    def _crop_boxes(self, m: int, h: int, w: int, g: torch.Generator | None) -> torch.Tensor:
        """(m, 4) integer boxes (top, left, height, width) as torchvision's RandomResizedCrop.

        Ten attempts per row are drawn at once; the first valid one wins; rows with none fall back
        to the central crop with the aspect ratio clamped to ``ratio`` (torchvision's fallback).
        """
        tries = 10
        area = float(h * w)
        target = area * (
            self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(m, tries, generator=g)
        )
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * torch.rand(m, tries, generator=g))
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        u_top, u_left = torch.rand(m, tries, generator=g), torch.rand(m, tries, generator=g)
        # randint(0, h - ch + 1) as floor(u * (h - ch + 1)), valid where ok.
        top = torch.floor(u_top * (h - ch + 1).clamp(min=1))
        left = torch.floor(u_left * (w - cw + 1).clamp(min=1))
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((m,), -1))
        # Fallback: whole image cropped to the nearest allowed aspect ratio, centred.
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fh, fw = h, int(round(h * self.ratio[1]))
        else:
            fw, fh = w, h
        fb = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=torch.float32)
        pick = first.clamp(min=0)[:, None]
        boxes = torch.stack([t.gather(1, pick)[:, 0] for t in (top, left, ch, cw)], dim=1)
        return torch.where((first >= 0)[:, None], boxes, fb.expand(m, 4))

    def _draw(self, m: int, h: int, w: int, g: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Draw ``m`` parameter sets on the CPU, in a fixed order (reproducible for a seed)."""
        boxes = self._crop_boxes(m, h, w, g)
        flip = torch.rand(m, generator=g) < self.flip_p
        apply_jitter = torch.rand(m, generator=g) < self.jitter_p
        order = torch.randint(0, len(_ORDERS), (m,), generator=g)
        u = torch.rand(m, 4, generator=g)
        b, c, s, hue = self.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue])
        hi = torch.tensor([1 + b, 1 + c, 1 + s, hue])
        factors = lo + (hi - lo) * u
        gray = torch.rand(m, generator=g) < self.gray_p
        return {
            "boxes": boxes,
            "flip": flip,
            "apply_jitter": apply_jitter,
            "order": order,
            "factors": factors,
            "gray": gray,
        }

    def draw_params(
        self,
        n: int,
        n_views: int,
        h: int = 32,
        w: int = 32,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The parameters of ``forward`` for a batch of ``n`` images, one row per output view.

        Args:
            n: images in the batch.
            n_views: views per image.
            h, w: image size.
            generator: one CPU generator for the batch, ``None`` (torch's global one), or a
                sequence of ``n`` generators: image i's ``n_views`` parameter sets are then drawn
                from generator i alone (the same draws in both modes), independent of the batch.

        Returns:
            dict of CPU tensors with first dim ``n_views * n`` (view-major): ``boxes`` (top, left,
            height, width), ``flip``, ``apply_jitter``, ``order`` (index into the 24 orders of
            brightness/contrast/saturation/hue), ``factors`` (brightness, contrast, saturation
            factors and hue shift), ``gray``. In ``shared`` mode with one generator, rows of the
            same view are equal.
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            gens = list(generator)
            if len(gens) != n:
                raise ValueError(f"got {len(gens)} view generators for {n} images")
            per = [self._draw(n_views, h, w, g) for g in gens]  # per[i][k][v]: image i, view v
            return {
                k: torch.stack([p[k] for p in per], dim=1).reshape(
                    n_views * n, *per[0][k].shape[1:]
                )
                for k in per[0]
            }
        if self.mode == "shared":
            p = self._draw(n_views, h, w, generator)
            return {k: v.repeat_interleave(n, dim=0) for k, v in p.items()}
        return self._draw(n_views * n, h, w, generator)

    # ------------------------------------------------------------------ ops
    def _crop_flip(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[-2:]
        boxes = p["boxes"].to(device=x.device, dtype=x.dtype)
        top, left, bh, bw = boxes.unbind(1)
        sx = bw / w
        sx = torch.where(p["flip"].to(x.device), -sx, sx)
        grid = crop_grid(sx, (2 * left + bw) / w - 1, bh / h, (2 * top + bh) / h - 1, self.size)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    @staticmethod
    def _jitter_group(x: torch.Tensor, order: Sequence[int], f: torch.Tensor) -> torch.Tensor:
        for op in order:
            if op == 0:
                x = adjust_brightness(x, f[:, 0])
            elif op == 1:
                x = adjust_contrast(x, f[:, 1])
            elif op == 2:
                x = adjust_saturation(x, f[:, 2])
            else:
                x = adjust_hue(x, f[:, 3])
        return x

    def _jitter(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # Rows are sorted by jitter order (-1 = not jittered) with ONE gather, the contiguous
        # groups run their four ops as batches, and ONE gather restores the row order. (A gather
        # per group made the backward ~20x slower: each one scatters into a full-size zero tensor.)
        key = torch.where(p["apply_jitter"], p["order"], torch.full_like(p["order"], -1))
        if bool((key == -1).all()):
            return x
        factors = p["factors"]
        keys, counts = torch.unique_consecutive(key, return_counts=True)
        perm = None
        if len(keys) > MAX_RUNS:  # rows of one draw are scattered (per_sample mode): sort them
            perm = torch.argsort(key, stable=True)
            keys, counts = torch.unique_consecutive(key[perm], return_counts=True)
            x, factors = x.index_select(0, perm.to(x.device)), factors.index_select(0, perm)
        # else (shared mode: one run per view) the groups are slices already: no gathers, and
        # each row sees the same ops, so the same numbers
        sizes = counts.tolist()
        fs = factors.to(device=x.device, dtype=x.dtype).split(sizes)
        parts = [
            xg if k < 0 else self._jitter_group(xg, _ORDERS[k].tolist(), fg)
            for k, xg, fg in zip(keys.tolist(), x.split(sizes), fs)
        ]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out if perm is None else out.index_select(0, torch.argsort(perm).to(x.device))

    def forward(
        self,
        x: torch.Tensor,
        n_views: int,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """``n_views`` random views of every image, view-major.

        Args:
            x: images in [0, 1], float, shape (N, 3, H, W); may require grad.
            n_views: number of views per image (>= 1).
            generator: CPU ``torch.Generator`` for every random draw (``None``: torch's global one),
                or a sequence of N generators, one per image (see :meth:`draw_params`).

        Returns:
            (n_views * N, 3, size, size) views in [0, 1]; row ``v * N + i`` is view ``v`` of
            image ``i``, in ``x``'s dtype (autocast is off inside, so a surrounding bf16
            autocast does not reach the image). Differentiable w.r.t. ``x``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"views expect RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        with full_precision(x.device):  # the views transform the image: never autocast
            return self._views(x, n_views, generator)

    def _views(self, x: torch.Tensor, n_views: int, generator) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.draw_params(n, n_views, h, w, generator)
        xr = x.repeat(n_views, 1, 1, 1)
        out = self._crop_flip(xr, p)
        out = self._jitter(out, p)
        gray = p["gray"]
        if bool(gray.any()):
            flags, sizes = torch.unique_consecutive(gray, return_counts=True)
            if len(flags) <= MAX_RUNS:  # shared mode: slices, no full-size where
                parts = [
                    grayscale(o).expand_as(o) if f else o
                    for f, o in zip(flags.tolist(), out.split(sizes.tolist()))
                ]
                out = torch.cat(parts) if len(parts) > 1 else parts[0]
            else:
                gray = gray.to(x.device).view(-1, 1, 1, 1)
                out = torch.where(gray, grayscale(out).expand_as(out), out)
        return out
