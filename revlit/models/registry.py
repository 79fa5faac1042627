"""Registry of classifier architectures by name, so checkpoints can rebuild their model.

A checkpoint names its architecture; :func:`build` looks that name up in this table and nowhere
else, so a file can only choose among constructors the code registered, never import or call
something of its own choosing. Names are either short ones (``resnet20``, ``wrn28_10``) or a
:class:`~revlit.models.base.Classifier` subclass's class path (``revlit.models.resnet.CifarResNet``,
what :meth:`~revlit.models.base.Classifier.arch_spec` writes), registered with :func:`register_class`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MODULES = ("resnet", "preact", "wideresnet")  # modules whose import registers their models


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model constructor under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if _REGISTRY.get(name, fn) is not fn:
            raise ValueError(f"model name '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def class_name(cls: type) -> str:
    """The registered name of a class: its class path ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: register ``cls`` under its class path (see :func:`class_name`)."""
    return register(class_name(cls))(cls)


def available() -> list[str]:
    """Names of all registered architectures."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def is_registered(name: object) -> bool:
    """Whether ``name`` is a registered architecture name."""
    _ensure_loaded()
    return isinstance(name, str) and name in _REGISTRY


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name (never imports a name it does not know).

    Raises:
        ValueError: one line naming the unknown architecture and the known ones.
    """
    if not is_registered(name):
        short = sorted(n for n in _REGISTRY if "." not in n)
        raise ValueError(
            f"unknown model {str(name)[:80]!r}; registered names: {', '.join(short)} "
            "(or a class path listed by revlit.models.available())"
        )
    return _REGISTRY[name](**kwargs)


def _ensure_loaded() -> None:
    # Importing the modules runs their @register / @register_class decorators.
    import importlib

    for mod in _MODULES:
        importlib.import_module(f"revlit.models.{mod}")
