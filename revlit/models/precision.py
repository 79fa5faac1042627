"""Reduced-precision (bf16 / fp16) autocast for the backbone, with the hardware detected, not assumed.

The reverse attack of Mao et al. (ICCV 2021) and the PGD attacks spend nearly all their time in
the classifier's forward and input-gradient passes. Those passes can run under
``torch.autocast`` in bfloat16 (or float16 on GPUs); everything that decides *where the image
goes* stays in float32: the iterate, the sign step, the projection onto the ε-ball and the
[0, 1] box, the views (they transform the image), the contrastive loss (a log-softmax over
thousands of negatives) and the classifier's final decision.

A precision is one of:

* ``None`` -- follow the autocast that surrounds the call (Lightning's ``--trainer.precision``,
  or the user's own ``torch.autocast``); float32 when there is none.
* ``"32"`` -- float32, even inside a surrounding autocast.
* ``"bf16"`` / ``"16"`` -- autocast to bfloat16 / float16 on the images' device.
* ``"auto"`` -- ``"bf16"`` where :func:`bf16_supported` says the device has bf16 arithmetic in
  hardware, else ``"32"``.

Lightning's spellings (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``) are accepted too.
Framework-free: plain ``torch``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

#: accepted precision names -> canonical name (``None`` follows the surrounding autocast)
_ALIASES = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "16",
    "16-mixed": "16",
    "fp16": "16",
    "auto": "auto",
}
PRECISIONS = ("32", "bf16", "16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
#: x86 CPU flags (``/proc/cpuinfo``) of bf16 arithmetic in hardware: AVX-512 BF16 and AMX-BF16
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_precision(precision: str | None) -> str | None:
    """The canonical name of ``precision`` (``None``, ``"32"``, ``"bf16"``, ``"16"``, ``"auto"``).

    Raises:
        ValueError: one line naming the accepted values.
    """
    if precision is None:
        return None
    key = str(precision).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISIONS)} (or Lightning's 32-true, "
            f"bf16-mixed, 16-mixed), or None to follow the surrounding autocast; got '{precision}'"
        )
    return _ALIASES[key]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` has bfloat16 arithmetic in hardware (not merely emulated).

    CPU: the flags ``avx512_bf16`` (AVX-512 BF16) or ``amx_bf16`` (Intel AMX) in
    ``/proc/cpuinfo``; without them torch still runs bf16, by converting to float32 and back,
    which is slower than float32. CUDA: ``torch.cuda.is_bf16_supported`` without emulation
    (compute capability 8.0 and newer). Any other device: False.
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(dev):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # older signature without the emulation switch
                return bool(torch.cuda.is_bf16_supported())
    return False


def compute_dtype(precision: str | None, device: torch.device | str) -> torch.dtype:
    """The dtype the backbone computes in on ``device`` for ``precision``.

    ``None`` reads the surrounding autocast now (call it before switching autocast off):
    its dtype where it is on for ``device``, else ``torch.float32``. ``"auto"`` is
    ``torch.bfloat16`` where :func:`bf16_supported`, else ``torch.float32``.
    """
    name = check_precision(precision)
    dev = torch.device(device)
    if name is None:
        on = torch.is_autocast_enabled(dev.type)
        return torch.get_autocast_dtype(dev.type) if on else torch.float32
    if name == "auto":
        name = "bf16" if bf16_supported(dev) else "32"
    return _DTYPES.get(name, torch.float32)


def autocast_to(
    dtype: torch.dtype, device: torch.device | str
) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; for ``torch.float32``, autocast off."""
    dev = torch.device(device).type
    if dtype == torch.float32:
        return torch.autocast(dev, enabled=False)
    return torch.autocast(dev, dtype=dtype)


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device``: ops run in their inputs' dtype (float32 here)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``t``'s lower-precision ops to, or None if autocast is off there."""
    dev = t.device.type
    if t.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None
