"""RST (Carmon et al. 2019) checkpoint loading: key mapping, logits against a TRADES-layout
reference forward written with torch.nn.functional, and the converter CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from revlit.models.checkpoint import CheckpointError, load_classifier
from revlit.models.rst import (
    infer_wrn_config,
    load_rst_checkpoint,
    revlit_to_rst_state_dict,
    rst_to_revlit_state_dict,
    wrn_from_rst_state_dict,
)
from revlit.models.rst import main as rst_main
from revlit.models.wideresnet import WideResNet


def _bn(sd: dict, name: str, c: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
    sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def _conv(c_out: int, c_in: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(c_out, c_in, k, k, generator=g) * (2.0 / (c_in * k * k)) ** 0.5


def trades_state_dict(depth: int, widen: int, num_classes: int = 10, seed: int = 0) -> dict:
    """A random WRN state_dict in the TRADES/RST layout, as saved from nn.DataParallel."""
    g = torch.Generator().manual_seed(seed)
    n = (depth - 4) // 6
    chans = [16, 16 * widen, 32 * widen, 64 * widen]
    sd: dict[str, torch.Tensor] = {"conv1.weight": _conv(16, 3, 3, g)}
    for name, b in (("block1", 1), ("sub_block1", 1), ("block2", 2), ("block3", 3)):
        c_in, c_out = chans[b - 1], chans[b]
        for i in range(n):
            p = f"{name}.layer.{i}"
            ci = c_in if i == 0 else c_out
            _bn(sd, f"{p}.bn1", ci, g)
            sd[f"{p}.conv1.weight"] = _conv(c_out, ci, 3, g)
            _bn(sd, f"{p}.bn2", c_out, g)
            sd[f"{p}.conv2.weight"] = _conv(c_out, c_out, 3, g)
            if ci != c_out:
                sd[f"{p}.convShortcut.weight"] = _conv(c_out, ci, 1, g)
    _bn(sd, "bn1", chans[3], g)
    sd["fc.weight"] = torch.randn(num_classes, chans[3], generator=g) / chans[3] ** 0.5
    sd["fc.bias"] = 0.1 * torch.randn(num_classes, generator=g)
    return {f"module.{k}": v for k, v in sd.items()}


def trades_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Reference forward of the TRADES WideResNet (eval mode), from the raw source state_dict."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}

    def bn(t, name):
        return F.batch_norm(
            t,
            sd[f"{name}.running_mean"],
            sd[f"{name}.running_var"],
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for b in (1, 2, 3):
        i = 0
        while f"block{b}.layer.{i}.conv1.weight" in sd:
            p = f"block{b}.layer.{i}"
            stride = 2 if b > 1 and i == 0 else 1
            act = F.relu(bn(out, f"{p}.bn1"))
            if f"{p}.convShortcut.weight" in sd:  # not equalInOut: shortcut on the activation
                skip = F.conv2d(act, sd[f"{p}.convShortcut.weight"], stride=stride)
            else:
                skip = out
            h = F.conv2d(act, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            h = F.relu(bn(h, f"{p}.bn2"))
            out = F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1) + skip
            i += 1
    out = F.relu(bn(out, "bn1"))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])


def _write_rst(path: Path, sd: dict) -> Path:
    # The released file holds more than the weights (e.g. an optimizer state and the epoch).
    torch.save({"state_dict": sd, "epoch": 200, "num_classes": 10}, path)
    return path


@pytest.mark.parametrize("depth,widen", [(10, 1), (16, 2)])
def test_rst_checkpoint_gives_reference_logits(tmp_path, depth, widen):
    sd = trades_state_dict(depth, widen, seed=depth)
    model = load_rst_checkpoint(_write_rst(tmp_path / "rst.pt.ckpt", sd))
    assert isinstance(model, WideResNet) and not model.training
    assert model.config["depth"] == depth and model.config["widen_factor"] == widen
    assert model.config["mean"] is None and model.config["std"] is None
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = trades_forward(sd, x)
        out = model(x)
        feats = model.features(x)
    assert feats.shape == (4, 64 * widen)
    assert ref.abs().max() > 0.1  # a non-degenerate reference
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # The identity normalisation matters: a CIFAR-normalising WRN with the same weights differs.
    normed = WideResNet(depth, widen)
    normed.load_state_dict({**model.state_dict(), "mean": normed.mean, "std": normed.std})
    with torch.no_grad():
        assert not torch.allclose(normed.eval()(x), ref, atol=1e-3)


def test_key_mapping_round_trips():
    sd = trades_state_dict(16, 2, seed=3)
    mapped = rst_to_revlit_state_dict(sd)
    assert not any(k.startswith(("module.", "sub_block1")) for k in mapped)
    own = WideResNet(16, 2, mean=None, std=None).state_dict()
    assert set(mapped) | {"mean", "std"} == set(own)
    back = revlit_to_rst_state_dict(mapped)
    expected = {
        k.removeprefix("module."): v
        for k, v in sd.items()
        if not k.startswith("module.sub_block1.")
    }
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    # Loaded into the model and read back, every tensor lands where it came from.
    model = wrn_from_rst_state_dict(sd)
    again = revlit_to_rst_state_dict(model.state_dict())
    for k, v in expected.items():
        assert torch.equal(again[k], v), k


def test_infer_config_and_bad_dicts():
    sd = trades_state_dict(10, 1)
    assert infer_wrn_config(sd) == {"depth": 10, "widen_factor": 1, "num_classes": 10}
    extra = dict(sd, **{"module.head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="head.weight"):
        wrn_from_rst_state_dict(extra)
    missing = {k: v for k, v in sd.items() if not k.endswith("block2.layer.0.conv2.weight")}
    with pytest.raises(CheckpointError, match="missing"):
        wrn_from_rst_state_dict(missing)
    wrong = dict(sd, **{"module.fc.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match="fc.bias"):
        wrn_from_rst_state_dict(wrong)


def test_wrn28_10_layout_loads():
    """The full-size RST architecture: construction + strict load (no forward, for speed)."""
    sd = trades_state_dict(28, 10, seed=0)
    assert sum(1 for k in sd if ".sub_block1." in k) > 0
    model = wrn_from_rst_state_dict(sd)
    assert model.feature_dim == 640 and model.config["depth"] == 28
    assert model.config["widen_factor"] == 10
    assert torch.equal(model.stages[2][3].conv2.weight, sd["module.block3.layer.3.conv2.weight"])
    assert torch.equal(
        model.stages[1][0].shortcut.weight, sd["module.block2.layer.0.convShortcut.weight"]
    )
    assert torch.equal(model.bn_out.running_var, sd["module.bn1.running_var"])
    n_src = sum(
        v.numel() for k, v in sd.items() if "sub_block1" not in k and "num_batches" not in k
    )
    n_own = sum(v.numel() for k, v in model.state_dict().items() if "num_batches" not in k) - 6
    assert n_src == n_own


def test_converter_cli_writes_revlit_checkpoint(tmp_path, capsys):
    """``python -m revlit.models.rst IN OUT`` (its ``main``, run in-process for speed)."""
    sd = trades_state_dict(10, 1, seed=5)
    src = _write_rst(tmp_path / "cifar10_rst_adv.pt.ckpt", sd)
    dst = tmp_path / "out" / "wrn_rst.pt"
    rst_main([str(src), str(dst)])
    model, info = load_classifier(dst)
    assert info["sha256"] in capsys.readouterr().out
    assert info["meta"]["source_file"] == src.name
    assert isinstance(model, WideResNet) and model.config["mean"] is None
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trades_forward(sd, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit) as e:
        rst_main([str(tmp_path / "nope.ckpt"), str(dst)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("revlit: error:") and err.count("\n") == 1 and "nope.ckpt" in err
