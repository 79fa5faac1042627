"""Precision names, hardware detection and the backbone's autocast (revlit.models.precision)."""

from __future__ import annotations

import pytest
import torch

from revlit.models import precision as prec
from revlit.models.precision import (
    autocast_to,
    bf16_supported,
    check_precision,
    compute_dtype,
    full_precision,
)


@pytest.mark.parametrize(
    "name,canonical",
    [(None, None), ("32", "32"), ("32-true", "32"), ("bf16", "bf16"), ("bf16-mixed", "bf16"),
     ("16-mixed", "16"), ("AUTO", "auto")],
)  # fmt: skip
def test_names_and_lightning_spellings(name, canonical):
    assert check_precision(name) == canonical


@pytest.mark.parametrize("bad", ["64", "bf32", "half", ""])
def test_unknown_precision_is_one_line(bad):
    with pytest.raises(ValueError, match="precision must be one of") as err:
        check_precision(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "flags,expected",
    [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
     (set(), False)],
)  # fmt: skip
def test_cpu_bf16_is_read_from_the_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset(flags))
    assert bf16_supported("cpu") is expected
    assert compute_dtype("auto", "cpu") == (torch.bfloat16 if expected else torch.float32)


def test_the_flags_are_this_machines():
    flags = prec.cpu_flags()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        assert flags == frozenset()
        return
    assert bf16_supported("cpu") == any(f" {f}" in text for f in prec.CPU_BF16_FLAGS)
    if "avx2" in text.split():
        assert "avx2" in flags


def test_other_devices():
    assert bf16_supported("meta") is False
    if not torch.cuda.is_available():
        assert bf16_supported("cuda") is False


def test_none_follows_the_surrounding_autocast_and_32_overrides_it():
    assert compute_dtype(None, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(None, "cpu") == torch.bfloat16
        assert compute_dtype("32", "cpu") == torch.float32
        with autocast_to(torch.float32, "cpu"):
            assert not torch.is_autocast_enabled("cpu")
        with full_precision("cpu"):
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    assert compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype("16", "cpu") == torch.float16
    with autocast_to(torch.bfloat16, "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
