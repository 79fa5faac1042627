"""Data: CIFAR-10 loading, the DataModule, stored adversarial test sets."""

from revlit.data.cifar import (
    CLASSES,
    DatasetInvalid,
    DatasetNotFound,
    default_data_dir,
    load_cifar10,
)
from revlit.data.datamodule import CIFAR10DataModule, ImageSet, random_crop_flip

__all__ = [
    "CLASSES",
    "CIFAR10DataModule",
    "DatasetInvalid",
    "DatasetNotFound",
    "ImageSet",
    "default_data_dir",
    "load_cifar10",
    "random_crop_flip",
]
