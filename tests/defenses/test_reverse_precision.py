"""The reverse attack in bf16: gradients agree with float32 on real images; the iterate, its ball
and box, the loss and the final decision stay float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from revlit.data.cifar import default_data_dir, find_batches, load_cifar10
from revlit.defenses import ReversePurifier
from revlit.defenses.evaluate import defend_batch
from revlit.losses import ContrastiveLoss
from revlit.models.base import frozen_eval
from revlit.models.checkpoint import load_classifier
from revlit.models.precision import autocast_to
from revlit.ssl import SimCLRViews
from revlit.ssl.head import load_head, ssl_loss
from tests.defenses.test_reverse import gen, images, make_parts

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER, HEAD = ROOT / "checkpoints/resnet20_at.pt", ROOT / "checkpoints/resnet20_at_head.pt"
EPS = 16 / 255

#: bf16 against float32 input gradients of the SSL loss: cosine of the whole batch's gradient,
#: the lowest cosine of one image's, and the share of pixels whose step sign agrees (the Linf
#: step moves each pixel by sign(gradient)). Measured on the shipped ResNet-20 (AT) and its head,
#: 16 CIFAR-10 test images, 4 views, five draws: whole >= 0.998, per image >= 0.991, sign
#: agreement >= 0.982. A gradient with 20 % relative noise scores 0.98 / 0.98 / 0.73.
MIN_COSINE, MIN_IMAGE_COSINE, MIN_SIGN_AGREEMENT = 0.995, 0.98, 0.95


def agreement(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(whole-batch cosine, lowest per-image cosine, sign agreement) of ``g`` against ``ref``."""
    whole = F.cosine_similarity(g.flatten(), ref.flatten(), dim=0)
    per_image = F.cosine_similarity(g.flatten(1), ref.flatten(1), dim=1)
    return float(whole), float(per_image.min()), float((g.sign() == ref.sign()).float().mean())


def passes(scores: tuple[float, float, float]) -> bool:
    return (
        scores[0] >= MIN_COSINE and scores[1] >= MIN_IMAGE_COSINE
        and scores[2] >= MIN_SIGN_AGREEMENT
    )  # fmt: skip


@pytest.mark.skipif(
    find_batches(default_data_dir()) is None or not CLASSIFIER.exists() or not HEAD.exists(),
    reason="needs CIFAR-10 at $REVLIT_DATA_DIR and the shipped checkpoints",
)
def test_bf16_input_gradient_agrees_with_float32_on_real_images():
    net, _ = load_classifier(CLASSIFIER)
    net = net.to(memory_format=torch.channels_last)
    head, _ = load_head(HEAD)
    xs, _ = load_cifar10(default_data_dir(), train=False, check_md5=False)
    x = xs[:16].float() / 255

    def loss_and_grad(dtype):
        xr = x.clone().requires_grad_(True)
        with frozen_eval(net, head), autocast_to(dtype, "cpu"):  # the purifier's step
            per = ssl_loss(
                net, head, SimCLRViews(), ContrastiveLoss(), xr, 4, gen(0),
                reduction="none", chunk=256, lean=True,
            )  # fmt: skip
            (g,) = torch.autograd.grad(per.sum(), xr)
        return per.detach(), g

    l32, g32 = loss_and_grad(torch.float32)
    lbf, gbf = loss_and_grad(torch.bfloat16)
    assert lbf.dtype == torch.float32 and gbf.dtype == torch.float32
    assert not torch.equal(gbf, g32)  # the backbone did run in bf16
    assert (lbf - l32).abs().max() < 0.05 * l32.abs().max()
    scores = agreement(gbf, g32)
    assert passes(scores), scores
    # the bounds are not vacuous: 20 % relative noise on the float32 gradient fails them
    scale = g32.flatten(1).norm(dim=1).view(-1, 1, 1, 1) / g32[0].numel() ** 0.5
    noisy = g32 + 0.2 * scale * torch.randn(g32.shape, generator=gen(1))
    assert not passes(agreement(noisy, g32))


def test_bf16_purify_keeps_the_iterate_its_ball_and_box_exact_in_float32():
    clf, head, loss = make_parts()
    x = images(8)
    x[:, :, :4], x[:, :, -4:] = 0.0, 1.0  # pixels on the faces of the box

    def purify(precision, outer=None):
        pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=4, n_views=2,
                              precision=precision)  # fmt: skip
        with torch.autocast("cpu", dtype=outer or torch.bfloat16, enabled=outer is not None):
            return pur.purify(x, gen(1))

    out, losses = purify("bf16")
    assert out.dtype == losses.dtype == torch.float32
    # the float32 box of the projection, exactly: [fl(x - ε), fl(x + ε)] ∩ [0, 1]
    assert ((out >= x - EPS) & (out <= x + EPS)).all()
    assert out.min() >= 0 and out.max() <= 1 and (out - x).abs().amax() > EPS / 2
    assert not torch.equal(out.bfloat16().float(), out)  # the iterate is not on bf16's grid
    ref, ref_losses = purify("32")
    assert not torch.equal(out, ref)  # bf16 did reach the backbone
    # "32" holds inside a surrounding autocast; None follows it; the result is the same bits
    assert torch.equal(purify("32", outer=torch.bfloat16)[0], ref)
    assert torch.equal(purify(None, outer=torch.bfloat16)[0], out)
    assert torch.equal(purify(None)[0], ref)


def test_the_final_decision_is_float32_inside_a_bf16_autocast():
    clf, head, loss = make_parts()
    x, y = images(8), torch.arange(8) % 10
    seen = []
    hook = clf.register_forward_hook(
        lambda m, i, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
    )
    pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=2, n_views=2)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = defend_batch(clf, pur, x, y, torch.arange(8), seed=0)
            inner = clf(x).dtype
    finally:
        hook.remove()
    assert inner == torch.bfloat16  # a plain call here would be bf16
    assert seen[:-1] and all(s == (torch.float32, False) for s in seen[:-1])
    assert res.rows["loss_def"].dtype == torch.float32
    assert torch.isfinite(res.rows["loss_def"]).all()
