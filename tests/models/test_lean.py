"""Lean input gradients: bitwise the same as autograd's, with far fewer bytes saved for backward."""

import pytest
import torch
from torch import nn

from revlit.models import lean as lean_mod
from revlit.models.lean import MaskArena, lean_input_grad
from revlit.models.preact import PreActResNet
from revlit.models.resnet import CifarResNet
from revlit.models.wideresnet import WideResNet
from tests.models.test_fold import _random_bn


def _frozen(model: nn.Module, fmt) -> nn.Module:
    model = _random_bn(model).to(memory_format=fmt)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _features_and_grad(model, x, lean: bool):
    xr = x.detach().requires_grad_(True)
    if lean:
        with lean_input_grad() as mode:
            f = model.features(xr)
    else:
        mode, f = None, model.features(xr)
    w = torch.linspace(-1, 1, f.shape[1], device=f.device)
    (g,) = torch.autograd.grad((f * w).square().sum(), xr)
    return f.detach(), g, mode


MODELS = {
    "resnet8": lambda: CifarResNet(depth=8),
    "preact": lambda: PreActResNet(depth=18, width=8),
    "wrn10_1": lambda: WideResNet(depth=10, widen_factor=1),
}


@pytest.fixture
def nan_placeholders(monkeypatch):
    """Fill the backward placeholders with NaN: if a kernel read them, the gradient would show it.

    (The BatchNorm products write their placeholder in full before anything reads it.)
    """
    real = lean_mod._placeholder
    monkeypatch.setattr(lean_mod, "_placeholder", lambda meta: real(meta).fill_(float("nan")))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bn_products", [True, False])
def test_lean_gradient_is_bitwise_autograds(name, fmt, bn_products, nan_placeholders, monkeypatch):
    monkeypatch.setattr(lean_mod, "BN_PRODUCTS", bn_products)
    model = _frozen(MODELS[name](), fmt)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=fmt)
    f0, g0, _ = _features_and_grad(model, x, lean=False)
    f1, g1, mode = _features_and_grad(model, x, lean=True)
    assert mode.replaced["conv2d"] > 0 and mode.replaced["batch_norm"] > 0
    assert mode.replaced["relu"] > 0
    assert torch.equal(f1, f0)
    assert not g1.isnan().any()  # the placeholders were never read
    assert torch.equal(g1, g0)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_lean_saves_an_eighth_of_the_activations():
    model = _frozen(CifarResNet(depth=20), torch.channels_last)
    x = torch.rand(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    plain = _saved_bytes(lambda: model.features(x))

    def lean():
        with lean_input_grad() as mode:
            model.features(x)
        return mode

    modes = []
    small = _saved_bytes(lambda: modes.append(lean()))
    small += modes[0].arena.mask_bytes  # the masks live outside autograd's saved tensors
    # ResNet-20: ~1.5 MB per image plain; ~0.18 MB of masks + parameters and buffers when lean
    assert plain / 32 > 1.2e6
    assert small < plain / 6, (small, plain)


def test_weights_that_need_grad_and_training_batchnorm_fall_through():
    model = _random_bn(CifarResNet(depth=8))  # parameters require grad
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    with lean_input_grad() as mode:
        f = model.features(x)
    assert mode.replaced["conv2d"] == 0 and mode.replaced["batch_norm"] == 0
    f.sum().backward()
    assert model.conv1.weight.grad is not None  # weight gradients still work
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    with lean_input_grad() as mode:
        model.features(x)
    assert mode.replaced["batch_norm"] == 0  # training-mode BatchNorm is left to autograd
    # no grad wanted: nothing is replaced
    with torch.no_grad(), lean_input_grad() as mode:
        model.eval().features(x)
    assert sum(mode.replaced.values()) == 0


def test_inplace_relu_and_mask_strides():
    x = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    for inplace in (False, True):
        y = x * 1.0
        with lean_input_grad():
            out = nn.functional.relu(y, inplace=inplace)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(g, (x > 0).float())
        assert out.is_contiguous(memory_format=torch.channels_last)
    arena = MaskArena(block_bytes=200)
    a, b = torch.relu(torch.randn(2, 3, 4, 4)), torch.relu(torch.randn(2, 3, 4, 4))
    ma = arena.mask_of(a.contiguous(memory_format=torch.channels_last))
    mb = arena.mask_of(b)  # 96 + 96 bytes: the same block
    assert ma.untyped_storage().data_ptr() == mb.untyped_storage().data_ptr()
    assert torch.equal(ma, a > 0) and torch.equal(mb, b > 0)
    assert ma.stride() == a.contiguous(memory_format=torch.channels_last).stride()
    mc = arena.mask_of(b)  # no room left: a new block
    assert mc.untyped_storage().data_ptr() != mb.untyped_storage().data_ptr()


def test_a_reusing_arena_hands_out_its_blocks_again_and_refuses_stale_masks():
    model = _frozen(CifarResNet(depth=8), torch.channels_last)
    arena = MaskArena(block_bytes=2**16, reuse=True)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    grads, blocks = [], []
    for _ in range(2):
        arena.reset()
        with lean_input_grad(arena):
            f = model.features(x)
        blocks.append([b.untyped_storage().data_ptr() for b in arena._blocks])
        grads.append(torch.autograd.grad(f.square().sum(), x)[0])
    assert blocks[0] == blocks[1] and len(blocks[0]) > 1  # the same blocks, step after step
    assert torch.equal(grads[0], grads[1])
    with lean_input_grad(arena):
        f = model.features(x)
    arena.reset()  # f's masks are now stale: its backward must not read the next step's
    with pytest.raises(RuntimeError, match="handed out again"):
        torch.autograd.grad(f.sum(), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_placeholders_are_never_read(nan_placeholders, monkeypatch):
    """On a GPU machine: if this passes, "cuda" may be added to lean.VERIFIED_DEVICES."""
    monkeypatch.setattr(lean_mod, "VERIFIED_DEVICES", ("cpu", "cuda"))
    model = _frozen(CifarResNet(depth=8), torch.channels_last).cuda()
    x = torch.rand(6, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    f0, g0, _ = _features_and_grad(model, x, lean=False)
    f1, g1, mode = _features_and_grad(model, x, lean=True)
    assert mode.replaced["conv2d"] > 0 and mode.replaced["batch_norm"] > 0
    assert not g1.isnan().any()
    torch.testing.assert_close(f1, f0)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float_relu_budget_keeps_the_first_outputs_and_the_same_gradient(name, nan_placeholders):
    model = _frozen(MODELS[name](), torch.channels_last)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    _, g0, _ = _features_and_grad(model, x, lean=False)
    counts, kept = [], []
    for budget in (0, 4 * 16 * 32 * 32 * 4 * 3, 2**40):  # none, about three big ReLUs, all
        xr = x.detach().requires_grad_(True)
        with lean_input_grad(relu_float_bytes=budget) as mode:
            f = model.features(xr)
        w = torch.linspace(-1, 1, f.shape[1])
        (g,) = torch.autograd.grad((f * w).square().sum(), xr)
        assert torch.equal(g, g0)  # floats or masks: bitwise the same input gradient
        assert mode.relu_float_kept <= budget
        counts.append(mode.replaced["relu"])
        kept.append(mode.relu_float_kept)
    assert kept[0] == 0 and 0 < kept[1] < kept[2]
    assert counts[0] > counts[1] > counts[2] == 0  # masks only past the budget


def test_batchnorm_factors_follow_the_running_statistics():
    model = _frozen(CifarResNet(depth=8), torch.channels_last)
    x = torch.rand(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the second round runs on cached factors, after an in-place change
        _, g0, _ = _features_and_grad(model, x, lean=False)
        _, g1, _ = _features_and_grad(model, x, lean=True)
        assert torch.equal(g1, g0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_var.mul_(1.7)
                    m.weight.add_(0.25)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_under_bf16_autocast_the_gradient_is_bitwise_autograds(name, nan_placeholders):
    """autocast casts conv inputs to bf16; lean must cast the same way (else a dtype mismatch in
    the backward) and give the same bf16 features and float32 input gradient as autograd."""
    model = _frozen(MODELS[name](), torch.channels_last)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f0, g0, _ = _features_and_grad(model, x, lean=False)
        f1, g1, mode = _features_and_grad(model, x, lean=True)
    _, g32, _ = _features_and_grad(model, x, lean=False)
    assert mode.replaced["conv2d"] > 0 and mode.replaced["batch_norm"] > 0
    assert f0.dtype == f1.dtype == torch.bfloat16  # autocast reached the backbone
    assert g1.dtype == torch.float32 and not g1.isnan().any()
    assert torch.equal(f1, f0) and torch.equal(g1, g0)
    assert not torch.equal(g1, g32)  # a bf16 gradient, not the float32 one
