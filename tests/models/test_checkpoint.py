"""Classifier checkpoints: weights-only loading refuses code, save/load round-trips exactly."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from revlit.models.checkpoint import (
    CheckpointError,
    load_classifier,
    safe_load,
    save_classifier,
    sha256_file,
)
from revlit.models.preact import PreActResNet
from revlit.models.resnet import CifarResNet
from revlit.models.wideresnet import WideResNet


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_payload_really_runs_code_under_plain_pickle(tmp_path):
    """Sanity check of the attack used below: an unsafe unpickler does create the marker."""
    marker = tmp_path / "pwned_plain"
    data = pickle.dumps({"state_dict": _Payload(str(marker))})
    pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_running_checkpoint_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"format": "revlit-classifier/1", "state_dict": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(CheckpointError) as e:
        load_classifier(path)
    assert not marker.exists()
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError):
        safe_load(path)
    assert not marker.exists()


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a revlit classifier"):
        load_classifier(tmp_path / "foreign.pt")


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: CifarResNet(depth=8, width=2),
        lambda: PreActResNet(width=8, num_classes=7),
        lambda: WideResNet(10, 1, mean=None, std=None),
        lambda: WideResNet(16, 2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    ],
)
def test_save_load_round_trip_gives_identical_logits(tmp_path, make):
    torch.manual_seed(0)
    model = _randomise_bn(make())
    path = tmp_path / "c.pt"
    digest = save_classifier(model, path, meta={"note": "round trip"})
    loaded, info = load_classifier(path)
    assert type(loaded) is type(model) and not loaded.training
    assert info["sha256"] == digest == sha256_file(path)
    assert info["meta"]["note"] == "round trip"
    assert loaded.config == model.config
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))
    # A fresh model of the same architecture gives other logits: the weights were really loaded.
    with torch.no_grad():
        assert not torch.allclose(make().eval()(x), model(x))


def test_tiny_classifier_fixture(tiny_classifier_ckpt):
    model, info = load_classifier(tiny_classifier_ckpt)
    assert isinstance(model, CifarResNet) and model.config["depth"] == 8
    assert len(info["sha256"]) == 64
    # BatchNorm statistics were saved non-trivially (not the defaults 0 / 1).
    assert model.bn1.running_mean.abs().sum() > 0


def _rewrite(path, **changes):
    obj = torch.load(path, weights_only=True)
    obj.update(changes)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "arch",
    [
        "revlit.models.checkpoint.save_classifier",  # a callable under revlit.models
        "revlit.models.external.load_external",
        "os.system",
        "revlit.models.resnet.BasicBlock",  # a real class, but not a registered architecture
        ["resnet20"],
    ],
)
def test_architecture_chosen_by_the_file_must_be_registered(
    tiny_classifier_ckpt, arch, monkeypatch
):
    called = []
    import revlit.models.checkpoint as ck

    monkeypatch.setattr(ck, "save_classifier", lambda *a, **k: called.append(a))
    _rewrite(tiny_classifier_ckpt, arch=arch, arch_kwargs={})
    with pytest.raises(CheckpointError, match="not registered") as e:
        load_classifier(tiny_classifier_ckpt)
    assert "\n" not in str(e.value) and not called


def test_shipped_style_class_path_and_short_names_load(tiny_classifier_ckpt):
    # the shipped checkpoints store the class path of CifarResNet
    arch = torch.load(tiny_classifier_ckpt, weights_only=True)["arch"]
    assert arch == "revlit.models.resnet.CifarResNet"
    model, info = load_classifier(tiny_classifier_ckpt)
    assert isinstance(model, CifarResNet) and info["arch"] == arch


@pytest.mark.parametrize(
    "change, match",
    [
        ({"arch_kwargs": {"depth": 9}}, "do not fit"),  # constructor refuses
        ({"arch_kwargs": {"depth": 20}}, "do not fit"),  # weights of another shape
        ({"arch_kwargs": ["depth"]}, "arch_kwargs"),
        ({"state_dict": {"w": "x"}}, "state_dict"),
    ],
)
def test_weights_that_do_not_fit_give_one_line(tiny_classifier_ckpt, change, match):
    _rewrite(tiny_classifier_ckpt, **change)
    with pytest.raises(CheckpointError, match=match) as e:
        load_classifier(tiny_classifier_ckpt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["fc.weight", "bn1.running_var"])
def test_non_finite_classifier_weights_are_refused(tiny_classifier_ckpt, bad, key):
    state = torch.load(tiny_classifier_ckpt, weights_only=True)["state_dict"]
    state[key].view(-1)[0] = bad
    _rewrite(tiny_classifier_ckpt, state_dict=state)
    with pytest.raises(CheckpointError, match=f"NaN/inf value.*'{key}'") as e:
        load_classifier(tiny_classifier_ckpt)
    assert "\n" not in str(e.value)


def test_unregistered_architecture_is_not_saved(tmp_path):
    class Local(CifarResNet):
        pass

    with pytest.raises(CheckpointError, match="unregistered"):
        save_classifier(Local(depth=8), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("name", ["resnet20_at.pt", "resnet20_std.pt"])
def test_shipped_checkpoints_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "checkpoints" / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped in this checkout")
    model, info = load_classifier(path)
    assert isinstance(model, CifarResNet) and model.config["depth"] == 20
