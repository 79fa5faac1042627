"""Classifiers: [0,1] input, normalisation inside, penultimate features exposed."""

from revlit.models.base import Classifier
from revlit.models.checkpoint import load_classifier, safe_load, save_classifier, sha256_file
from revlit.models.external import ExternalClassifier, load_external
from revlit.models.registry import available, build

__all__ = [
    "Classifier",
    "ExternalClassifier",
    "available",
    "build",
    "load_classifier",
    "load_external",
    "safe_load",
    "save_classifier",
    "sha256_file",
]
