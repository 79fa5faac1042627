"""Carmon et al.'s RST checkpoint ("Unlabeled Data Improves Adversarial Robustness", NeurIPS 2019)
as a revlit :class:`~revlit.models.wideresnet.WideResNet`.

The released file ``cifar10_rst_adv.pt.ckpt`` is a dict whose ``state_dict`` holds a WRN-28-10
trained with TRADES-style robust self-training (Linf 8/255), saved from ``nn.DataParallel`` (keys
prefixed ``module.``) in the TRADES key layout::

    conv1.weight                                   -> stem.weight
    block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}.* -> stages.{0,1,2}.{i}.{bn1,conv1,bn2,conv2}.*
    block{1,2,3}.layer.{i}.convShortcut.weight     -> stages.{0,1,2}.{i}.shortcut.weight
    bn1.*                                          -> bn_out.*
    fc.{weight,bias}                               -> fc.{weight,bias}
    sub_block1.*                                   -> dropped (built but never used in forward)

The model takes raw [0, 1] input (no normalisation), so it is built with ``mean=None, std=None``.
Everything is read with ``torch.load(..., weights_only=True)``
(:func:`revlit.models.checkpoint.safe_load`).

Convert once into a revlit classifier checkpoint::

    python -m revlit.models.rst cifar10_rst_adv.pt.ckpt checkpoints/wrn28_10_rst.pt
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from revlit.models.checkpoint import CheckpointError, safe_load, save_classifier, sha256_file
from revlit.models.wideresnet import WideResNet

_BLOCK = re.compile(r"^block([123])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(\w+)$")
_STAGE = re.compile(r"^stages\.([012])\.(\d+)\.(bn1|conv1|bn2|conv2|shortcut)\.(\w+)$")
_TOP_TO_OURS = {"conv1": "stem", "bn1": "bn_out", "fc": "fc"}
_OURS_TO_TOP = {v: k for k, v in _TOP_TO_OURS.items()}


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict:
    """Remove ``nn.DataParallel``'s ``module.`` prefix from every key that has it."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def rst_key_to_revlit(key: str) -> str | None:
    """Map one TRADES/RST WideResNet key (without ``module.``) to revlit's name.

    Returns:
        The revlit key, or ``None`` for keys that are dropped (``sub_block1.*``).

    Raises:
        ValueError: the key belongs to neither layout (one line naming it).
    """
    if key.startswith("sub_block1."):
        return None
    if m := _BLOCK.match(key):
        stage, idx, part, param = m.groups()
        part = "shortcut" if part == "convShortcut" else part
        return f"stages.{int(stage) - 1}.{idx}.{part}.{param}"
    top, _, param = key.partition(".")
    if top in _TOP_TO_OURS and param and "." not in param:
        return f"{_TOP_TO_OURS[top]}.{param}"
    raise ValueError(f"unexpected key '{key}' in a TRADES/RST WideResNet state_dict")


def revlit_key_to_rst(key: str) -> str | None:
    """Inverse of :func:`rst_key_to_revlit`; ``None`` for revlit-only buffers (``mean``, ``std``)."""
    if key in ("mean", "std"):
        return None
    if m := _STAGE.match(key):
        stage, idx, part, param = m.groups()
        part = "convShortcut" if part == "shortcut" else part
        return f"block{int(stage) + 1}.layer.{idx}.{part}.{param}"
    top, _, param = key.partition(".")
    if top in _OURS_TO_TOP and param and "." not in param:
        return f"{_OURS_TO_TOP[top]}.{param}"
    raise ValueError(f"unexpected key '{key}' in a revlit WideResNet state_dict")


def rst_to_revlit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TRADES/RST WideResNet state_dict (``module.`` prefixes allowed) in revlit's key names.

    ``sub_block1.*`` is dropped; revlit's ``mean``/``std`` buffers are not added.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in strip_prefix(state_dict).items():
        new = rst_key_to_revlit(k)
        if new is not None:
            out[new] = v
    return out


def revlit_to_rst_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A revlit WideResNet state_dict in TRADES/RST key names (no prefix, no ``sub_block1``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        new = revlit_key_to_rst(k)
        if new is not None:
            out[new] = v
    return out


def infer_wrn_config(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{"depth", "widen_factor", "num_classes"}`` of a TRADES-layout WRN from its tensor shapes.

    Raises:
        ValueError: the state_dict lacks the keys or shapes of a TRADES WideResNet.
    """
    sd = strip_prefix(state_dict)
    try:
        stem_out = sd["conv1.weight"].shape[0]
        width1 = sd["block1.layer.0.conv1.weight"].shape[0]
        num_classes = sd["fc.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a TRADES/RST WideResNet state_dict: no key {e}") from None
    blocks = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == "1"}
    n = max(blocks) + 1
    if stem_out != 16 or width1 % 16 != 0 or blocks != set(range(n)):
        raise ValueError(
            f"not a TRADES/RST WideResNet state_dict: stem {stem_out} channels, "
            f"first stage {width1} channels, blocks {sorted(blocks)}"
        )
    return {"depth": 6 * n + 4, "widen_factor": width1 // 16, "num_classes": int(num_classes)}


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded RST checkpoint (``obj["state_dict"]``, or ``obj`` itself)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise CheckpointError(f"{source} holds no state_dict of tensors")
    return obj


def wrn_from_rst_state_dict(state_dict: dict[str, torch.Tensor]) -> WideResNet:
    """Build a :class:`WideResNet` (identity normalisation, eval mode) from a TRADES-layout dict.

    Depth, widen factor and class count are read from the tensor shapes; every weight and
    BatchNorm statistic must be present (``num_batches_tracked`` may be missing, as in very old
    checkpoints) and none may be left over.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (one line).
    """
    try:
        cfg = infer_wrn_config(state_dict)
        mapped = rst_to_revlit_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = WideResNet(**cfg, mean=None, std=None)
    own = model.state_dict()
    for k in ("mean", "std"):
        mapped[k] = own[k]
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = v
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"RST state_dict does not fit WRN-{cfg['depth']}-{cfg['widen_factor']}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"RST state_dict shape mismatch at {bad[0]}: "
            f"{tuple(mapped[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict(mapped)
    return model.eval()


def load_rst_checkpoint(path: str | os.PathLike) -> WideResNet:
    """Load Carmon et al.'s ``cifar10_rst_adv.pt.ckpt`` (or any TRADES-layout WRN checkpoint).

    Args:
        path: the checkpoint file; loaded with ``weights_only=True``.

    Returns:
        A :class:`WideResNet` (WRN-28-10 for the RST file) in eval mode with identity
        normalisation: it takes raw [0, 1] images (N, 3, 32, 32) and returns logits (N, 10).

    Raises:
        CheckpointError: missing/unsafe file or a state_dict that does not fit (one line).
    """
    return wrn_from_rst_state_dict(extract_state_dict(safe_load(path), str(path)))


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write the RST checkpoint ``src`` as a revlit classifier checkpoint ``dst``; return its sha256."""
    model = load_rst_checkpoint(src)
    meta = {
        "source": "Carmon et al. 2019, robust self-training (RST), converted by revlit.models.rst",
        "source_file": Path(src).name,
        "source_sha256": sha256_file(src),
        "normalization": "none (raw [0,1] input)",
    }
    return save_classifier(model, dst, meta=meta)


def main(argv: list[str] | None = None) -> None:
    """``python -m revlit.models.rst IN.pt.ckpt OUT.pt``: convert, print the output's sha256."""
    parser = argparse.ArgumentParser(
        prog="python -m revlit.models.rst",
        description="Convert Carmon et al.'s RST WRN-28-10 checkpoint into a revlit classifier checkpoint.",
    )
    parser.add_argument("src", help="the RST checkpoint, e.g. cifar10_rst_adv.pt.ckpt")
    parser.add_argument("dst", help="output revlit checkpoint, e.g. checkpoints/wrn28_10_rst.pt")
    args = parser.parse_args(argv)
    try:
        digest = convert(args.src, args.dst)
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"revlit: error: {msg}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.dst} (sha256 {digest})")


if __name__ == "__main__":
    main()
