"""Bring your own classifier: the adapter's features, the spec forms, refusals, RobustBench."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revlit.io import sha256_file
from revlit.models import ExternalClassifier, load_classifier
from revlit.models.checkpoint import CheckpointError
from revlit.models.external import parse_robustbench, robustbench_weights

CLASS = "tests.models.test_external.UserNet"


class UserNet(nn.Module):
    """A user's model: the output layer is registered *before* the body, an unused linear after."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.out = nn.Linear(2 * width, 10)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.mix = nn.Linear(width, 2 * width)
        self.unused = nn.Linear(3, 3)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x - 0.5))), 1).flatten(1)
        return F.relu(self.mix(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class OwnFeatures(UserNet):
    """A model with its own ``features()``: revlit uses it instead of the hook."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SoftmaxOut(UserNet):
    """Logits passed through log_softmax after the last linear layer: not the contract."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.out(self.body(x)), 1)


class WrongClasses(UserNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :7]


def _weights(tmp_path, cls=UserNet, wrap: bool = False, **kw):
    torch.manual_seed(0)
    net = cls(**kw)
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 32, 32))  # non-trivial BatchNorm statistics
    sd = net.eval().state_dict()
    path = tmp_path / "user.pt"
    torch.save({"state_dict": sd} if wrap else sd, path)
    return net, path


def test_hook_features_are_the_last_linear_input(tmp_path):
    net, path = _weights(tmp_path)
    model, info = load_classifier({"class_path": CLASS, "weights": str(path)})
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        want = net.body(x)  # the input of ``out``, the last linear layer called
        f = model.features(x)
        assert torch.equal(f, want)
        assert model.feature_dim == 8 and f.shape == (5, 8)
        assert torch.equal(model.logits_from_features(f), net(x))
        assert torch.equal(model(x), net(x))
    assert model.last_linear is model.net.out
    # features keep the graph to the input (the purifier and the attacks differentiate them)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.features(xg).sum(), xg)
    assert g.abs().sum() > 0
    # the last linear layer is not registered a second time
    assert set(model.state_dict()) == {f"net.{k}" for k in net.state_dict()}
    assert info["sha256"] == sha256_file(path) and info["arch"] == CLASS


def test_own_features_method_is_used(tmp_path):
    net, path = _weights(tmp_path, OwnFeatures)
    model, _ = load_classifier(f"tests.models.test_external.OwnFeatures:{path}")
    calls = []
    net_forward = model.net.forward
    model.net.forward = lambda x: calls.append(1) or net_forward(x)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.features(x), net.body(x))
    assert calls == []  # no full forward through the hook


def test_spec_forms_agree_and_weights_may_be_wrapped(tmp_path):
    net, path = _weights(tmp_path, wrap=True, width=6)
    specs = [
        {"class_path": CLASS, "init_args": {"width": 6}, "weights": str(path)},
        json.dumps({"class_path": CLASS, "init_args": {"width": 6}, "weights": str(path)}),
    ]
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for spec in specs:
        model, info = load_classifier(spec)
        assert info["arch_kwargs"] == {"width": 6} and info["sha256"] == sha256_file(path)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert torch.equal(outs[0], net(x))


@pytest.mark.parametrize(
    "cls, match",
    [
        (SoftmaxOut, "not its last linear layer applied"),
        (WrongClasses, r"expected logits of shape \(4, 10\)"),
    ],
)
def test_refuses_models_outside_the_contract(tmp_path, cls, match):
    _, path = _weights(tmp_path, cls)
    with pytest.raises(ValueError, match=match):
        load_classifier(f"tests.models.test_external.{cls.__name__}:{path}")


def test_refuses_non_finite_logits():
    net = UserNet()
    with torch.no_grad():
        net.out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite logits"):
        ExternalClassifier(net)


def test_bad_specs_give_one_line_errors(tmp_path):
    _, path = _weights(tmp_path)
    with pytest.raises(ValueError, match="no class 'Nope'"):
        load_classifier(f"tests.models.test_external.Nope:{path}")
    with pytest.raises(ValueError, match="cannot import"):
        load_classifier(f"no_such_pkg.Net:{path}")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_classifier({"class_path": CLASS, "init_args": {"width": 5}, "weights": str(path)})
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(f"{CLASS}:{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="needs 'class_path' and 'weights'"):
        load_classifier({"class_path": CLASS})
    with pytest.raises(ValueError, match="threat model must be one of"):
        parse_robustbench("robustbench:Carmon2019Unlabeled:L1")
    # a pickled object in the weights file is refused (weights_only)
    torch.save({"state_dict": UserNet()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_classifier(f"{CLASS}:{tmp_path / 'pickled.pt'}")


def test_robustbench_spec_parsing(monkeypatch):
    monkeypatch.delenv("REVLIT_ROBUSTBENCH_DIR", raising=False)
    assert parse_robustbench("robustbench:Carmon2019Unlabeled") == (
        "Carmon2019Unlabeled",
        "Linf",
        "checkpoints/robustbench",
    )
    monkeypatch.setenv("REVLIT_ROBUSTBENCH_DIR", "/zoo")
    assert parse_robustbench("robustbench:Rice2020Overfitting:L2")[1:] == ("L2", "/zoo")
    assert parse_robustbench({"robustbench": "X", "model_dir": "d"}) == ("X", "Linf", "d")


#: a small CIFAR-10 Linf model of the zoo (a WRN-28-4), so the test writes ~23 MB, not 146
RB_NAME = "Ding2020MMA"


@pytest.mark.skipif(
    importlib.util.find_spec("robustbench") is None,
    reason="robustbench not installed (optional extra: pip install 'revlit[zoo]')",
)
def test_robustbench_model_loads_from_its_model_dir(tmp_path):
    from revlit.models.external import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    net = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][RB_NAME]["model"]().eval()
    path = robustbench_weights(RB_NAME, "Linf", tmp_path)
    path.parent.mkdir(parents=True)
    # RobustBench's own checkpoint layout: {"state_dict": ...} with DataParallel's "module." prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    model, info = load_classifier(
        {"robustbench": RB_NAME, "threat_model": "Linf", "model_dir": str(tmp_path)}
    )
    assert info["sha256"] == sha256_file(path) and info["source"] == "robustbench"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))  # the weights written are the weights loaded
        assert torch.allclose(model.logits_from_features(model.features(x)), net(x), atol=1e-5)
    assert model.feature_dim == model.last_linear.in_features
