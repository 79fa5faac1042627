"""Bring your own classifier: a user's ``nn.Module`` or a RobustBench model, given revlit's contract.

revlit's stages need three things of a classifier (:class:`revlit.models.Classifier`): ``forward(x)``
logits for images x in [0, 1] (float, NCHW; normalisation inside the model), ``features(x)`` the
penultimate vector (N, feature_dim) the self-supervised head of Mao et al. (ICCV 2021) reads, and
``logits_from_features(f)``. :class:`ExternalClassifier` gives any CIFAR-10 ``nn.Module`` that
contract:

* ``features`` is the model's own ``features()`` method when it has one, else the input of the
  last ``nn.Linear`` the forward pass calls (a forward hook);
* ``logits_from_features`` is the model's own method when it has one, else that linear layer;
* one probe forward on a fixed random batch finds ``feature_dim`` and checks that the logits are
  finite, of shape (N, num_classes), and equal ``logits_from_features(features(x))``: a model whose
  last linear layer is followed by another operation is refused (its features would not be what
  the logits are computed from).

Classifier specs (:func:`load_external`; :func:`revlit.models.load_classifier` dispatches to it):

* ``{"class_path": "pkg.module.Net", "init_args": {...}, "weights": "net.pt"}`` (a mapping, or
  the same as a JSON string), or the string ``"pkg.module.Net:net.pt"`` (no ``init_args``): the user's class, built with ``init_args`` and loaded with the
  state dict in ``weights`` (a plain state dict, or a dict with a ``"state_dict"`` entry; loaded
  with ``weights_only=True``, strictly). The class path is whatever the user writes on the command
  line or in YAML; no class path is ever read from a weights file.
* ``"robustbench:Carmon2019Unlabeled"`` (CIFAR-10, Linf) or ``"robustbench:<name>:L2"``, or
  ``{"robustbench": name, "threat_model": "Linf", "model_dir": dir}``: loaded through
  ``robustbench.utils.load_model(name, model_dir, dataset="cifar10", threat_model=...)``
  (optional extra ``revlit[zoo]``). RobustBench keeps its weights under
  ``<model_dir>/cifar10/<threat_model>/<name>.pt`` and downloads them there on first use;
  ``model_dir`` defaults to ``$REVLIT_ROBUSTBENCH_DIR`` or ``checkpoints/robustbench``.

The classifier's identity, recorded in every artefact as ``info["sha256"]``, is the sha256 of the
bytes of its weights file (the file the user gave, or the file RobustBench reads), so it can be
checked with ``sha256sum``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revlit.io import sha256_file
from revlit.models.checkpoint import CheckpointError, safe_load

ROBUSTBENCH_PREFIX = "robustbench:"
#: threat models of RobustBench's CIFAR-10 leaderboards that revlit accepts
ROBUSTBENCH_THREATS = ("Linf", "L2")
#: environment variable naming RobustBench's model_dir; else DEFAULT_ROBUSTBENCH_DIR
ROBUSTBENCH_DIR_ENV = "REVLIT_ROBUSTBENCH_DIR"
DEFAULT_ROBUSTBENCH_DIR = "checkpoints/robustbench"
#: the probe batch: CIFAR-10-sized uniform noise from a fixed seed
PROBE_SHAPE = (4, 3, 32, 32)
PROBE_SEED = 0


class ExternalClassifier(nn.Module):
    """Wrap a CIFAR-10 ``nn.Module`` so it satisfies revlit's classifier contract.

    Args:
        net: the model; ``net(x)`` gives logits (N, num_classes) for x in [0, 1], (N, 3, H, W),
            normalising inside itself. Put in eval mode.
        num_classes: number of classes the logits must have (10 for CIFAR-10).
        probe_shape: shape of the probe batch (uniform noise in [0, 1], seed ``PROBE_SEED``).
        atol: tolerance of the check ``logits_from_features(features(x)) == net(x)`` (relative
            to the logits' scale).

    Raises:
        ValueError: one line: the probe's logits are not finite or of the wrong shape, the model
            has no ``nn.Linear`` and no ``features()``, the features are not (N, D), or the logits
            are not the last linear layer applied to the features.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        probe_shape: tuple[int, ...] = PROBE_SHAPE,
        atol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.num_classes = int(num_classes)
        # a method of the class, not a submodule called ``features`` (torchvision's VGG: conv maps)
        self._own_features = callable(getattr(type(net), "features", None))
        self._own_logits = callable(getattr(type(net), "logits_from_features", None))
        self._linear_name: str | None = None  # by name: not registered twice in the state dict
        self._captured: torch.Tensor | None = None
        self._capture = False
        probe = torch.rand(probe_shape, generator=torch.Generator().manual_seed(PROBE_SEED))
        self._probe(probe, atol)

    # ---------------------------------------------------------------- discovery
    def _probe(self, x: torch.Tensor, atol: float) -> None:
        called: list[nn.Linear] = []
        hooks = [
            m.register_forward_hook(lambda mod, inp, out: called.append(mod))
            for m in self.net.modules()
            if isinstance(m, nn.Linear)
        ]
        try:
            with torch.no_grad():
                logits = self.net(x)
        finally:
            for h in hooks:
                h.remove()
        if not torch.is_tensor(logits) or tuple(logits.shape) != (x.shape[0], self.num_classes):
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(
                f"the classifier's output on a probe batch of shape {tuple(x.shape)} is {shape}, "
                f"expected logits of shape ({x.shape[0]}, {self.num_classes})"
            )
        if not torch.isfinite(logits).all():
            raise ValueError("the classifier gives non-finite logits on a probe batch in [0, 1]")
        if called:
            names = {id(m): n for n, m in self.net.named_modules()}
            self._linear_name = names[id(called[-1])]
            self.last_linear.register_forward_hook(self._hook)
        elif not (self._own_features and self._own_logits):
            raise ValueError(
                "the classifier has no nn.Linear layer and no features()/logits_from_features(): "
                "revlit cannot find its penultimate features"
            )
        with torch.no_grad():
            f = self.features(x)
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the classifier's penultimate features have shape {tuple(f.shape)}, "
                    f"expected ({x.shape[0]}, D)"
                )
            again = self.logits_from_features(f)
        scale = float(logits.abs().max()) + 1.0
        if again.shape != logits.shape or not torch.allclose(again, logits, atol=atol * scale):
            raise ValueError(
                "the classifier's logits are not its last linear layer applied to its penultimate "
                "features (an operation follows that layer); give the model a features() and a "
                "logits_from_features() method"
            )
        self.feature_dim = int(f.shape[1])

    @property
    def last_linear(self) -> nn.Linear | None:
        """The last ``nn.Linear`` the model's forward pass calls (None if it has none)."""
        return None if self._linear_name is None else self.net.get_submodule(self._linear_name)

    def _hook(self, module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if self._capture:
            self._captured = inp[0]

    # ---------------------------------------------------------------- the contract
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images x in [0, 1], (N, 3, H, W)."""
        if self._own_features:
            return self.net.features(x)
        self._capture, self._captured = True, None
        try:
            self.net(x)
            f = self._captured
        finally:
            self._capture, self._captured = False, None
        if f is None:
            raise RuntimeError("the classifier's last linear layer was not called")
        return f

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) from penultimate features (N, feature_dim)."""
        if self._own_logits:
            return self.net.logits_from_features(f)
        return self.last_linear(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images x in [0, 1], (N, 3, H, W)."""
        return self.net(x)


# -------------------------------------------------------------------- specs
def is_external_spec(spec: Any) -> bool:
    """True if ``spec`` names a user module or a RobustBench model (not a revlit checkpoint)."""
    if isinstance(spec, dict):
        return True
    if not isinstance(spec, str):
        return False
    if spec.startswith(ROBUSTBENCH_PREFIX) or spec.lstrip().startswith("{"):
        return True
    return _split_class_spec(spec) is not None


def _split_class_spec(spec: str) -> tuple[str, str] | None:
    """``"pkg.mod.Net:weights.pt"`` -> ``("pkg.mod.Net", "weights.pt")``; None if not that form."""
    if Path(spec).exists():
        return None
    head, sep, weights = spec.partition(":")
    parts = head.split(".")
    if not sep or not weights or len(parts) < 2 or not all(p.isidentifier() for p in parts):
        return None
    return head, weights


def import_class(class_path: str) -> type:
    """The class named by a dotted path (``pkg.module.Class``); one-line ValueError otherwise.

    The current directory is importable (as for ``python -m``), so a user's file next to the
    command works: ``examples.my_classifier.SmallCNN``.
    """
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"class path '{class_path}' has no module (expected pkg.module.Class)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"cannot import '{module}' for classifier '{class_path}': {e}") from None
    except AttributeError:
        raise ValueError(f"module '{module}' has no class '{name}'") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"'{class_path}' is not an nn.Module class")
    return cls


def _state_dict_of(obj: Any, path: str) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (a dict of tensors)")
    return obj


def load_module(
    class_path: str, weights: str | os.PathLike, init_args: dict | None = None
) -> tuple[ExternalClassifier, dict]:
    """Build the user's ``class_path(**init_args)``, load ``weights`` strictly, wrap it.

    Returns:
        ``(classifier, info)``; ``info`` holds ``arch`` (the class path), ``arch_kwargs``,
        ``path`` (the weights file), ``sha256`` (of the weights file), ``feature_dim``, ``source``.
    """
    cls = import_class(class_path)
    state = _state_dict_of(safe_load(weights), str(weights))
    try:
        net = cls(**dict(init_args or {}))
    except TypeError as e:
        raise ValueError(f"cannot build {class_path}(**{dict(init_args or {})}): {e}") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{weights} does not fit {class_path}: {first}") from None
    model = ExternalClassifier(net)
    info = {
        "source": "module",
        "arch": class_path,
        "arch_kwargs": dict(init_args or {}),
        "meta": {},
        "path": str(weights),
        "sha256": sha256_file(weights),
        "feature_dim": model.feature_dim,
    }
    return model.eval(), info


def _alias_autoattack() -> None:
    """Let ``import autoattack`` find ``pyautoattack``.

    robustbench 1.1.1 (PyPI) declares ``pyautoattack`` as its dependency but its ``robustbench.eval``
    (imported by ``import robustbench``) imports the same code under the name ``autoattack``, which
    only a git install provides. ``load_model`` itself never calls it.
    """
    try:
        importlib.import_module("autoattack")
        return
    except ImportError:
        pass
    try:
        pkg = importlib.import_module("pyautoattack")
        state = importlib.import_module("pyautoattack.state")
    except ImportError:
        return
    sys.modules.setdefault("autoattack", pkg)
    sys.modules.setdefault("autoattack.state", state)


def import_robustbench():
    """``robustbench.utils.load_model`` (extra ``revlit[zoo]``); one-line error if missing."""
    _alias_autoattack()
    try:
        from robustbench.utils import load_model
    except ImportError as e:
        raise ValueError(
            f"RobustBench models need the optional extra: pip install 'revlit[zoo]' ({e})"
        ) from None
    return load_model


def parse_robustbench(spec: str | dict) -> tuple[str, str, str]:
    """``(name, threat_model, model_dir)`` from ``robustbench:Name[:Linf|L2]`` or a dict."""
    if isinstance(spec, str):
        parts = spec[len(ROBUSTBENCH_PREFIX) :].split(":")
        if len(parts) > 2 or not parts[0]:
            raise ValueError(f"expected robustbench:<name>[:Linf|L2], got '{spec}'")
        name, threat = parts[0], parts[1] if len(parts) == 2 else "Linf"
        model_dir = None
    else:
        name, threat = spec["robustbench"], spec.get("threat_model", "Linf")
        model_dir = spec.get("model_dir")
    if threat not in ROBUSTBENCH_THREATS:
        raise ValueError(
            f"RobustBench threat model must be one of {', '.join(ROBUSTBENCH_THREATS)}, "
            f"got '{threat}'"
        )
    model_dir = model_dir or os.environ.get(ROBUSTBENCH_DIR_ENV) or DEFAULT_ROBUSTBENCH_DIR
    return name, threat, str(model_dir)


def robustbench_weights(name: str, threat: str, model_dir: str | os.PathLike) -> Path:
    """Where RobustBench keeps (and first downloads) a CIFAR-10 model's weights."""
    return Path(model_dir) / "cifar10" / threat / f"{name}.pt"


def load_robustbench(spec: str | dict) -> tuple[ExternalClassifier, dict]:
    """Load a CIFAR-10 RobustBench model through ``robustbench.utils.load_model`` and wrap it.

    RobustBench downloads the weights into ``model_dir`` if they are not there (which needs the
    internet); ensembles stored as several files are not supported.
    """
    name, threat, model_dir = parse_robustbench(spec)
    load_model = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset.cifar_10][ThreatModel(threat)]
    if name not in zoo:
        raise ValueError(f"'{name}' is not a CIFAR-10 {threat} model of RobustBench")
    if isinstance(zoo[name].get("gdrive_id"), list):
        raise ValueError(
            f"RobustBench model '{name}' is an ensemble of several files (unsupported)"
        )
    net = load_model(name, model_dir=model_dir, dataset="cifar10", threat_model=threat)
    weights = robustbench_weights(name, threat, model_dir)
    model = ExternalClassifier(net)
    info = {
        "source": "robustbench",
        "arch": f"{ROBUSTBENCH_PREFIX}{name}:{threat}",
        "arch_kwargs": {},
        "meta": {"robustbench_name": name, "threat_model": threat},
        "path": str(weights),
        "sha256": sha256_file(weights),
        "feature_dim": model.feature_dim,
    }
    return model.eval(), info


def load_external(spec: str | dict) -> tuple[ExternalClassifier, dict]:
    """Load a user module or a RobustBench model from its spec (see the module docstring).

    A string holding a JSON object is read as the mapping form (a command-line value such as
    ``--model.init_args.classifier='{"class_path": ..., "weights": ...}'``).
    """
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"classifier spec is not valid JSON: {e}") from None
    if isinstance(spec, str) and spec.startswith(ROBUSTBENCH_PREFIX):
        return load_robustbench(spec)
    if isinstance(spec, dict):
        if "robustbench" in spec:
            return load_robustbench(spec)
        unknown = set(spec) - {"class_path", "init_args", "weights"}
        if "class_path" not in spec or "weights" not in spec or unknown:
            raise ValueError(
                "a classifier given as a mapping needs 'class_path' and 'weights' (and optionally "
                "'init_args'), or 'robustbench' (and optionally 'threat_model', 'model_dir'); "
                f"got keys {sorted(spec)}"
            )
        return load_module(spec["class_path"], spec["weights"], spec.get("init_args"))
    split = _split_class_spec(str(spec))
    if split is None:
        raise ValueError(f"not a classifier spec: '{spec}'")
    return load_module(*split)
