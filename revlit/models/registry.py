"""Registry of classifier architectures by name, so checkpoints can rebuild their model."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model constructor under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names of all registered architectures."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name.

    Raises:
        ValueError: one line naming the unknown architecture and the known ones.
    """
    _ensure_loaded()
    if name not in _REGISTRY and name.startswith("revlit.models."):
        import importlib

        module, _, cls = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), cls)(**kwargs)
        except (ImportError, AttributeError):
            raise ValueError(f"unknown model class '{name}'") from None
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def _ensure_loaded() -> None:
    # Importing the modules runs their @register decorators.
    import importlib

    for mod in ("resnet", "preact", "wideresnet"):
        importlib.import_module(f"revlit.models.{mod}")
