"""CIFAR10DataModule: CIFAR-10 train/val/test and stored PGD test sets, as [0,1] float batches.

Batches are tuples ``(x, y, idx)``: images in [0, 1] (float32, NCHW), labels (int64) and the
test-set index of each image (int64), so every stage downstream (attacks, defense, writers) can
say which CIFAR-10 test image a row is. Images stay uint8 on the host and become floats after the
transfer to the device; the training augmentation (pad-4 random crop + horizontal flip) runs there
on whole batches. No normalisation: the models normalise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from revlit.data.cifar import default_data_dir, load_cifar10

log = logging.getLogger("revlit")


class ImageSet(Dataset):
    """Images (uint8 or float in [0,1], (N,3,32,32)), labels (N,) and indices (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        if not (len(images) == len(labels) == len(indices)):
            raise ValueError("images, labels and indices must have the same length")
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.indices[i]


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None):
    """Pad-``pad`` (zeros) random crop and random horizontal flip, per image, on a batch.

    Args:
        x: images (N, C, H, W).
    Returns:
        Augmented images, same shape and dtype.
    """
    n, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (N,H,1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (N,1,W)
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols]  # (N,H,W,C)
    out = out.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)[:, None, None, None]
    return torch.where(flip, out.flip(3), out).contiguous()


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 (and stored adversarial test sets) for every revlit stage.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` (torchvision layout). Default:
            ``$REVLIT_DATA_DIR``, else ``data/``. md5 mismatches are logged, not refused.
        download: let torchvision download CIFAR-10 into ``data_dir`` if it is missing.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (the defense's negatives come from it).
        num_workers: DataLoader workers (0 keeps everything in the main process).
        val_size: images held out of the 50,000 training images for validation.
        split_seed: seed of the train/val split.
        augment: pad-4 crop + flip on training batches.
        eval_set: ``"clean"`` (the CIFAR-10 test set) or a stored adversarial set, by name under
            ``pgd_root`` or by path; served as the test and predict split.
        pgd_root: where stored sets live (``data/pgd`` by default).
        test_subset: use only the first N images of the evaluated split (None = all).
        allow_mismatch: serve a stored set made against a different classifier.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        eval_set: str = "clean",
        pgd_root: str = "data/pgd",
        test_subset: int | None = None,
        allow_mismatch: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if test_subset is not None and test_subset < 1:
            raise ValueError(f"test_subset must be >= 1 or null, got {test_subset}")
        if not 0 <= val_size < 50000:
            raise ValueError(f"val_size must be in [0, 50000), got {val_size}")
        self.data_dir = data_dir or default_data_dir()
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.eval_set = eval_set
        self.pgd_root = pgd_root
        self.test_subset = test_subset
        self.allow_mismatch = allow_mismatch
        self.eval_meta: dict | None = None
        self.train_set = self.val_set = self.test_set = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        if self.download:
            load_cifar10(self.data_dir, train=False, download=True, check_md5=False)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            x, y = load_cifar10(self.data_dir, train=True)
            g = torch.Generator().manual_seed(self.split_seed)
            perm = torch.randperm(len(y), generator=g)
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            self.train_set = ImageSet(x[train_idx], y[train_idx], train_idx)
            self.val_set = ImageSet(x[val_idx], y[val_idx], val_idx)
        if stage in (None, "test", "predict", "fit", "validate") and self.test_set is None:
            self.test_set = self._eval_split()

    def _eval_split(self) -> ImageSet:
        n = self.test_subset
        if self.eval_set == "clean":
            x, y = load_cifar10(self.data_dir, train=False)
            idx = torch.arange(len(y))
            self.eval_meta = {"name": "clean"}
        else:
            from revlit.data.stored import load_stored_set

            st = load_stored_set(self.resolve_set(self.eval_set))
            x, y, idx, self.eval_meta = st.images, st.labels, st.indices, st.meta
        if n is not None:
            if n > len(y):
                log.warning("test_subset %d > %d images in '%s'", n, len(y), self.eval_set)
            x, y, idx = x[:n], y[:n], idx[:n]
        return ImageSet(x, y, idx)

    def data_identity(self) -> dict:
        """What the evaluated split's images are: its name and the sha256 of its image file(s).

        Part of a run's settings (see :mod:`revlit.parts`): finished batches are reused only on
        the same data.
        """
        if self.eval_set == "clean":
            from revlit.data.cifar import TEST_FILES, find_batches
            from revlit.io import sha256_file

            folder = find_batches(self.data_dir)
            files = {f: sha256_file(folder / f) for f in TEST_FILES} if folder else None
            return {"split": "clean", "files_sha256": files}
        meta = self.eval_meta or {}
        return {"split": self.eval_set, "files_sha256": meta.get("files_sha256")}

    def resolve_set(self, name: str) -> Path:
        """A stored set's folder: ``name`` as a path if it exists, else ``pgd_root/name``."""
        p = Path(name)
        return p if p.exists() else Path(self.pgd_root) / name

    def check_classifier(self, sha256: str) -> None:
        """Refuse a stored set made against another classifier unless ``allow_mismatch``."""
        meta = self.eval_meta or {}
        made_for = meta.get("classifier_sha256")
        if made_for is None or made_for == sha256:
            return
        msg = (
            f"stored set '{self.eval_set}' was made against classifier {made_for[:12]}, "
            f"not {sha256[:12]}"
        )
        if not self.allow_mismatch:
            raise ValueError(msg + "; pass --data.allow_mismatch true to use it anyway")
        log.warning("%s (allowed by allow_mismatch)", msg)

    # ------------------------------------------------------------ loaders
    def _loader(self, ds, bs: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, idx = batch
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        trainer = getattr(self, "trainer", None)
        if self.augment and trainer is not None and trainer.training:
            x = random_crop_flip(x)
        return x.contiguous(memory_format=torch.channels_last), y, idx
