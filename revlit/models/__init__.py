"""Classifiers: [0,1] input, normalisation inside, penultimate features exposed."""

from revlit.models.base import Classifier
from revlit.models.checkpoint import load_classifier, safe_load, save_classifier, sha256_file
from revlit.models.registry import available, build

__all__ = [
    "Classifier",
    "available",
    "build",
    "load_classifier",
    "safe_load",
    "save_classifier",
    "sha256_file",
]
