"""Memory-lean input gradients through a frozen, eval-mode network (same numbers, ~8x less memory).

The reverse attack of Mao et al. (ICCV 2021) and the PGD attacks only need gradients with respect
to the *input* of a classifier whose parameters are frozen and whose BatchNorm layers are in eval
mode. For that gradient, autograd's default bookkeeping is wasteful: every convolution saves its
input and every BatchNorm saves its input (both only needed for *weight* gradients), and every
ReLU saves its float output. At the authors' setting (512 images × 4 views per step) a ResNet-20
keeps about 3 GB of such activations alive between the forward and the backward pass.

Inside :func:`lean_input_grad` the three ops are replaced by autograd functions that keep only what
the input gradient needs:

* ``conv2d`` (frozen weight): nothing but the weight. Backward is ATen's own
  ``convolution_backward`` with ``output_mask = (True, False, False)`` — the very call autograd's
  ``ConvolutionBackward0`` makes — on an *unread* placeholder of the input's shape and strides.
* ``batch_norm`` (eval mode, frozen affine): nothing but per-channel vectors. Backward is the
  product ATen's eval-mode CPU kernel computes, ``(grad * invstd) * weight`` with ``invstd``
  rounded from double, as two broadcast products (the same bits); elsewhere (other
  devices or dtypes) ATen's ``native_batch_norm_backward`` itself, on an unread placeholder.
* ``relu``: a 1-byte mask ``output > 0`` instead of the 4-byte output. Backward multiplies the
  incoming gradient by the mask, which equals ``threshold_backward`` for finite gradients.
  Making the masks costs a pass over the outputs, so with a budget (``relu_float_bytes``) the
  first ReLU outputs are kept as floats by autograd's own ReLU, and masks are made only past it:
  the same gradient either way.

So the input gradient is the same kernels on the same numbers: bitwise equal to autograd's (tests
check it on ResNet, pre-activation ResNet and WideResNet blocks, in both memory formats, with the
placeholders filled with NaN). A ResNet-20 keeps ~184 KB per image instead of ~1.5 MB. Masks are
carved out of 64 MB blocks (big enough for glibc to ``mmap`` them outside the heap), so long-lived
masks do not fragment the heap between the short-lived activations of the forward pass.

Under ``torch.autocast`` (bf16 / fp16) the replaced conv2d gets its input, weight and bias cast
to the autocast dtype *before* the autograd function, as autocast itself casts them: the cast's
backward returns the gradient to the input's float32, and the saved weight and the placeholder
have the dtype of the gradient the backward receives. Eval BatchNorm on a reduced-precision input
keeps float32 statistics (ATen's mixed-dtype kernels, as autocast leaves it), ReLU masks do not
depend on the dtype; the input gradient is again bitwise autograd's under the same autocast.

Every other op (additions, pooling, normalisation, linear layers) and every call that does not
qualify (weights that require grad, BatchNorm in training mode, string padding, and for conv and
BatchNorm any device but the CPU, where the placeholder trick has not been checked yet) falls
through to the ordinary implementation, so the context is always safe to use; it only saves memory where it
can. Framework-free: plain ``torch``.

Usage::

    with lean_input_grad():
        feats = classifier.features(x)           # x requires grad; classifier frozen, eval()
    (g,) = torch.autograd.grad(loss(feats), x)   # the backward may run after the block
"""

from __future__ import annotations

import mmap
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from revlit.models.precision import autocast_dtype

#: bytes of one mask block; above glibc's largest dynamic mmap threshold (32 MB), so every block
#: is its own mapping and goes back to the system when its last mask dies.
MASK_BLOCK_BYTES = 64 * 2**20
#: eval BatchNorm backward as two broadcast products on CPU float32 (False: ATen's own kernel)
BN_PRODUCTS = True
#: devices on which the conv / BatchNorm replacements (whose backward hands ATen an unread
#: placeholder input) were checked bitwise against autograd; elsewhere those two ops fall through
#: to autograd and only the ReLU masks are used, until a GPU run checks them (tests/models/test_lean.py)
VERIFIED_DEVICES = ("cpu",)


def _pair(v) -> list[int]:
    return [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _placeholder(meta: tuple) -> torch.Tensor:
    """An uninitialised tensor with the saved input's shape, strides, dtype and device.

    The ATen backward kernels read only its metadata (memory format, sizes) when no weight
    gradient is asked for, so its pages are never touched and cost no resident memory. (The
    BatchNorm products use one as their output buffer and write it in full.)
    """
    shape, stride, dtype, device = meta
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _mapped_block(nbytes: int) -> torch.Tensor:
    """A bool tensor of ``nbytes`` in its own anonymous memory mapping, outside malloc's heap.

    A plain ``torch.empty`` of this size would usually be carved from the heap's top chunk (glibc
    maps a block of its own only when the heap cannot serve it, and ``MALLOC_TOP_PAD_`` keeps a
    large top): long-lived masks there pin the heap under the short-lived activations and it
    grows by gigabytes. The mapping is returned to the system when the last mask of the block is
    freed (the tensor keeps the mmap object alive).
    """
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=torch.bool)


class MaskArena:
    """Hands out bool tensors for ReLU masks from large blocks.

    Args:
        block_bytes: size of each block. A mask larger than a block gets its own allocation.
        reuse: keep the blocks and hand them out again after :meth:`reset` (a loop that runs one
            forward + backward per step, like the purifier, then touches its mask memory once,
            not once per step). Without it a block is freed when the last mask carved from it is.

    A mask has the strides of the tensor it masks (e.g. channels_last), so the backward product
    keeps that memory format. With ``reuse``, a mask handed out before the last :meth:`reset` is
    stale: its backward raises instead of reading the new masks.
    """

    def __init__(self, block_bytes: int = MASK_BLOCK_BYTES, reuse: bool = False) -> None:
        self.block_bytes, self.reuse = int(block_bytes), bool(reuse)
        self._blocks: list[torch.Tensor] = []
        self._index, self._used = -1, 0
        #: bumped by :meth:`reset`; masks remember the generation they were handed out in
        self.generation = 0
        #: bytes of all masks handed out since the last reset (for tests and diagnostics)
        self.mask_bytes = 0

    def reset(self) -> None:
        """Hand out the kept blocks again from the start (``reuse``); earlier masks become stale."""
        self.generation += 1
        self._index, self._used, self.mask_bytes = -1, 0, 0
        if not self.reuse:
            self._blocks.clear()

    def _next_block(self) -> None:
        """Move on to the next block; without ``reuse`` only the current one is referenced."""
        if not self.reuse:
            self._blocks.clear()
            self._index = -1
        self._index, self._used = self._index + 1, 0
        if self._index == len(self._blocks):
            self._blocks.append(_mapped_block(self.block_bytes))

    def mask_of(self, out: torch.Tensor) -> torch.Tensor:
        """``out != 0`` as a bool tensor with ``out``'s strides (``out`` is a ReLU output)."""
        n = out.numel()
        self.mask_bytes += n
        dense = out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
        if not dense or out.device.type != "cpu" or n > self.block_bytes:
            return out != 0
        if self._index < 0 or self._used + n > self.block_bytes:
            self._next_block()
        flat = self._blocks[self._index][self._used : self._used + n]
        self._used += n
        mask = flat.as_strided(out.shape, out.stride())
        mask.copy_(out)  # float -> bool: nonzero is True; a ReLU output is > 0 exactly there
        return mask


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose backward gives the input gradient only, saving no activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.meta = (x.shape, x.stride(), x.dtype, x.device)
        ctx.conv = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gi, _, _ = torch.ops.aten.convolution_backward(
            grad, _placeholder(ctx.meta), weight, None, stride, padding, dilation,
            False, [0, 0], groups, [True, False, False],
        )  # fmt: skip
        return gi, None, None, None, None, None, None


#: id(running_var) -> (weak reference to it, key, (invstd, weight) broadcast views)
_BN_FACTORS: dict[int, tuple] = {}


def _bn_factors(running_var, weight, eps: float, dtype, dim: int) -> tuple:
    """``invstd`` (rounded from double, as ATen's CPU kernel) and ``weight``, shaped (1, C, 1, 1).

    Cached per BatchNorm until its statistics or weight change (in-place updates bump their
    version), so a purifier step does not recompute them for every chunk and layer; an entry
    goes when its ``running_var`` is freed.
    """
    key = (running_var._version, id(weight), weight._version, eps, dtype, dim)
    hit = _BN_FACTORS.get(id(running_var))
    if hit is not None and hit[0]() is running_var and hit[1] == key and hit[2][1]._base is weight:
        return hit[2]
    shape = (1, -1) + (1,) * (dim - 2)
    invstd = (1.0 / torch.sqrt(running_var.double() + eps)).to(dtype)
    factors = (invstd.view(shape), weight.view(shape))
    i = id(running_var)
    _BN_FACTORS[i] = (
        weakref.ref(running_var, lambda _, i=i: _BN_FACTORS.pop(i, None)),
        key,
        factors,
    )
    return factors


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch_norm whose backward gives the input gradient only, saving no activation."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.0, eps
        )
        ctx.meta, ctx.eps = (x.shape, x.stride(), x.dtype, x.device), eps
        ctx.fast = (
            BN_PRODUCTS and x.device.type == "cpu" and x.dtype == torch.float32
            and weight is not None
        )  # fmt: skip
        if ctx.fast:
            # ATen's CPU kernel in eval mode: grad_in = (grad * invstd) * weight per channel, with
            # invstd = 1 / sqrt(var + eps) in double, rounded to float. Two broadcast products
            # give the same bits at ~0.7x the cost (tests check it against autograd).
            ctx.save_for_backward(*_bn_factors(running_var, weight, eps, x.dtype, x.dim()))
        else:
            ctx.save_for_backward(weight, running_mean, running_var, save_mean, save_invstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.fast:
            invstd, weight = ctx.saved_tensors
            out = _placeholder(ctx.meta)  # written in full: the input's memory format
            return torch.mul(grad, invstd, out=out).mul_(weight), None, None, None, None, None
        weight, mean, var, save_mean, save_invstd = ctx.saved_tensors
        gi, _, _ = torch.ops.aten.native_batch_norm_backward(
            grad, _placeholder(ctx.meta), weight, mean, var, save_mean, save_invstd,
            False, ctx.eps, [True, False, False],
        )  # fmt: skip
        return gi, None, None, None, None, None


class _MaskedReLU(torch.autograd.Function):
    """ReLU that saves a 1-byte mask (from a :class:`MaskArena`) instead of its float output."""

    @staticmethod
    def forward(ctx, x, arena, inplace):
        if inplace:
            out = x.relu_()
            ctx.mark_dirty(out)
        else:
            out = torch.relu(x)
        # kept as an attribute, not via save_for_backward: masks are views of one shared block,
        # whose version counter every later mask bumps; the mask itself is never written again
        # (until a reusing arena's reset, which the generation check catches)
        ctx.mask, ctx.arena, ctx.generation = arena.mask_of(out), arena, arena.generation
        return out

    @staticmethod
    def backward(ctx, grad):
        # mask (0/1 in the gradient's dtype, the activation's memory format) times the gradient:
        # the incoming gradient may be NCHW-strided (e.g. from the pooling's backward) while the
        # next backward kernels want the activation's format; and this is faster than
        # threshold_backward on the float output
        if ctx.arena.reuse and ctx.generation != ctx.arena.generation:
            raise RuntimeError(
                "lean_input_grad: this graph's ReLU masks were handed out again after "
                "MaskArena.reset(); run its backward before the next reset"
            )
        mask = ctx.mask
        # uint8 -> float is a vectorised copy; bool -> float is not (2.5x slower on CPU)
        out = torch.empty_strided(mask.shape, mask.stride(), dtype=grad.dtype, device=grad.device)
        return out.copy_(mask.view(torch.uint8)).mul_(grad), None, None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _needs_input_grad(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()


def _frozen(*ts) -> bool:
    return all(t is None or not t.requires_grad for t in ts)


class lean_input_grad(TorchFunctionMode):  # noqa: N801 - used like a function: `with lean_input_grad():`
    """Context in which conv2d / eval batch_norm / relu keep only what the input gradient needs.

    Use it around the forward pass of a frozen (``requires_grad=False``), eval-mode network whose
    input requires grad; run the backward (``torch.autograd.grad`` w.r.t. the input) anywhere after.
    Weight gradients are not available through the replaced ops (they are frozen by requirement;
    a call with a weight that requires grad is left to autograd). Outside grad mode, or for
    inputs that do not require grad, every op runs unchanged.

    Args:
        arena: where the ReLU masks come from; default a fresh :class:`MaskArena` whose blocks
            die with the graph. A loop may pass one ``MaskArena(reuse=True)`` and ``reset()`` it
            before each forward.
        relu_float_bytes: the first ReLU outputs of the block, up to this many bytes in all,
            are kept as floats by autograd's own ReLU (its ``threshold_backward``, the same
            gradient) instead of as masks: making masks costs a pass over the outputs, so a
            step that fits in this budget runs faster at the cost of 4x the ReLU memory (see
            docs/speed.md). Default 0: masks only.

    Attributes:
        replaced: how many calls of each op were replaced (for tests and diagnostics).
        relu_float_kept: bytes of ReLU outputs kept as floats under ``relu_float_bytes``.
    """

    def __init__(self, arena: MaskArena | None = None, relu_float_bytes: int = 0) -> None:
        super().__init__()
        self.arena = arena if arena is not None else MaskArena()
        self.replaced = {"conv2d": 0, "batch_norm": 0, "relu": 0}
        self.relu_float_bytes, self.relu_float_kept = int(relu_float_bytes), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            padding = _arg(args, kwargs, 4, "padding", 0)
            if (
                _needs_input_grad(x)
                and x.device.type in VERIFIED_DEVICES
                and _frozen(w, b)
                and not isinstance(padding, str)
            ):
                self.replaced["conv2d"] += 1
                dtype = autocast_dtype(x)
                if dtype is not None:  # autocast's own casts, outside the Function (see above)
                    x, w = x.to(dtype), w.to(dtype)
                    b = None if b is None else b.to(dtype)
                return _FrozenConv2d.apply(
                    x, w, b, _arg(args, kwargs, 3, "stride", 1), padding,
                    _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1),
                )  # fmt: skip
        elif func is F.batch_norm:
            x = args[0]
            mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
            w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
            training = _arg(args, kwargs, 5, "training", False)
            eps = _arg(args, kwargs, 7, "eps", 1e-5)
            if (
                _needs_input_grad(x)
                and x.device.type in VERIFIED_DEVICES
                and not training
                and mean is not None
                and var is not None
                and _frozen(w, b, mean, var)
                and x.dim() == 4
            ):
                self.replaced["batch_norm"] += 1
                return _EvalBatchNorm.apply(x, mean, var, w, b, float(eps))
        elif func is F.relu:
            x, inplace = args[0], bool(_arg(args, kwargs, 1, "inplace", False))
            if _needs_input_grad(x) and x.dtype.is_floating_point:
                nbytes = x.numel() * x.element_size()
                if self.relu_float_kept + nbytes <= self.relu_float_bytes:
                    self.relu_float_kept += nbytes  # autograd's ReLU keeps its float output
                    return func(*args, **kwargs)
                self.replaced["relu"] += 1
                return _MaskedReLU.apply(x, self.arena, inplace)
        return func(*args, **kwargs)
