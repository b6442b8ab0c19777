"""``ulbench data prepare`` (the job of EDM2's ``dataset_tool.py convert``) and ``PreparedDataset``, its reader.

DEST is EDM2's dataset layout, a folder or an uncompressed (ZIP_STORED) zip: image ``idx`` (its source's position
in the sorted source list; a skipped file leaves a gap) as the PNG ``00000/img00000000.png``, EDM2's
``dataset.json`` = ``{"labels": [[name, label], ...]}`` (or ``null``), and our ``manifest.json``: the arguments,
class names, per image its source and hashes, what was skipped and why, and the dataset ``fingerprint``.

A run works in ``<DEST>.partial/`` (its arguments in a marker file, each PNG written atomically, a journal of
finished items) and ends by renaming it to DEST or packing it into DEST.zip, so a run killed at any moment and rerun
with the same arguments ends byte-identical to an uninterrupted one; no timestamps or worker counts are stored.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ulbench.data import png
from ulbench.data.base import ImageDataset
from ulbench.data.sources import IMAGE_EXTENSIONS, Source
from ulbench.data.transforms import DEFAULT_TRANSFORM, TRANSFORMS, UnreadableImage, apply_transform, decode_rgb
from ulbench.errors import UserError
from ulbench.io import atomic_write, read_journal

FORMAT = "ulbench-prepared/1"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "dataset.json"  # EDM2's name and layout
STAGING_SUFFIX = ".partial"
ARGUMENTS_FILE = ".ulbench-prepare-arguments.json"  # the staging marker: the arguments of the run it belongs to
JOURNAL_FILE = ".ulbench-prepare-journal.jsonl"  # one JSON line per finished or skipped source file
PACK_TMP_FILE = ".ulbench-pack.zip.tmp"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold: no timestamps in DEST
ZIP_EXTERNAL_ATTR = 0o100644 << 16  # regular file, rw-r--r--
ZIP_CREATE_SYSTEM_UNIX = 3
IMAP_CHUNKSIZE = 8
SKIP_UNREADABLE, SKIP_TOO_SMALL = "unreadable", "too-small"
SKIP_REASONS = (SKIP_UNREADABLE, SKIP_TOO_SMALL)
RERUN_HINT = "rerun the same `ulbench data prepare` command to finish it"


def archive_name(idx: int) -> str:
    """EDM2 dataset_tool.py: image idx is stored as 00000/img00000000.png."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


def pixels_sha256(rgb: np.ndarray) -> str:
    """sha256 of an (H, W, 3) uint8 image: its shape line then its HWC bytes."""
    h, w = rgb.shape[:2]
    return hashlib.sha256(f"{h}x{w}x3\n".encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


def dataset_fingerprint(rows) -> str:
    """sha256 over lines "name<TAB>label<TAB>pixels_sha256" in index order (label None when unlabelled)."""
    h = hashlib.sha256()
    for name, label, pix in rows:
        h.update(f"{name}\t{label}\t{pix}\n".encode())
    return h.hexdigest()


def encode_png(rgb: np.ndarray) -> bytes:
    """Deterministic PNG bytes of the prepared image: stored and unfiltered (``png``), so the loader decodes it
    with one zlib call; any PNG reader (EDM2's included) reads it."""
    return png.write_rgb(np.ascontiguousarray(rgb))


# ---- one source file -> one record (+ PNG bytes); runs in worker processes ----

_WORKER: dict = {}


def _init_worker(source: Source, transform: str, resolution: int) -> None:
    _WORKER.update(source=source, transform=transform, resolution=resolution)


def _process(task: tuple[int, str, bytes | None]) -> tuple[dict, bytes | None]:
    idx, name, data = task
    record = {"index": idx, "source": name}
    try:
        data = _WORKER["source"].read(name) if data is None else data
    except OSError as e:
        return record | {"skip": SKIP_UNREADABLE, "error": f"{type(e).__name__}: {e}"}, None
    record["source_sha256"] = hashlib.sha256(data).hexdigest()
    try:
        rgb, info = decode_rgb(data, name)
    except UnreadableImage as e:
        return record | {"skip": SKIP_UNREADABLE, "error": e.reason}, None
    out = apply_transform(_WORKER["transform"], rgb, _WORKER["resolution"])
    if out is None:
        w, h = info.size
        return record | {"skip": SKIP_TOO_SMALL, "error": f"{w}x{h} is too small for {_WORKER['transform']} "
                                                           f"at {_WORKER['resolution']}"}, None
    return record | {"pixels_sha256": pixels_sha256(out), "had_alpha": info.had_alpha}, encode_png(out)


# ---- the staging folder ----

def _write_file_atomic(path: Path, data: bytes) -> None:
    """tmp + rename (no fsync: a killed process loses nothing the page cache holds; rerun resumes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _read_journal(staging: Path) -> dict[int, dict]:
    """Finished items by index; a partial last line (killed mid-write) is cut off so appends start clean."""
    return {r["index"]: r for r in read_journal(staging / JOURNAL_FILE)}


def _staged_arguments(staging: Path) -> dict | None:
    for name in (ARGUMENTS_FILE, MANIFEST_FILE):
        if (staging / name).is_file():
            return json.loads((staging / name).read_text())["arguments"]
    return None


def _difference(have: dict, want: dict) -> str:
    diffs = [f"{k} {have.get(k)!r} there, {want[k]!r} now" for k in want if have.get(k) != want[k]]
    return "; ".join(diffs)


def _check_staging(staging: Path, arguments: dict, listing_sha256: str) -> None:
    have = _staged_arguments(staging)
    if have is None:
        raise UserError(f"{staging} exists but is not a ulbench staging folder; move or delete it")
    if have != arguments:
        raise UserError(f"{staging} holds an unfinished `ulbench data prepare` with other arguments "
                        f"({_difference(have, arguments)}). Rerun with its arguments to finish it, or delete "
                        f"{staging} to start over.")
    marker = staging / ARGUMENTS_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("source_listing_sha256") != listing_sha256:
        raise UserError(f"the files under SRC {arguments['source']} changed since {staging} was started; delete "
                        f"{staging} to start over")


# ---- the run ----

def _tasks(source: Source, todo: list[int]):
    if not source.sequential:
        return ((i, source.names[i], None) for i in todo)
    index = {source.names[i]: i for i in todo}
    return ((index[name], name, data) for name, data in source.stream(index))


def _results(source: Source, todo: list[int], transform: str, resolution: int, workers: int):
    """(record, PNG bytes) per ``todo`` index in task order: in this process for one worker, else from a Pool."""
    tasks = _tasks(source, todo)
    if workers <= 1:
        _init_worker(source, transform, resolution)
        try:
            yield from map(_process, tasks)
        finally:
            _WORKER.clear()
            source.close()  # the archive this process opened to read
        return
    with multiprocessing.Pool(workers, _init_worker, (source, transform, resolution)) as pool:  # exit terminates
        yield from pool.imap(_process, tasks, IMAP_CHUNKSIZE)


def _run(staging: Path, source: Source, todo: list[int], total: int, transform: str, resolution: int,
         workers: int, progress: bool) -> None:
    """Process the ``todo`` indices; this process writes each PNG, then its journal line."""
    bar = tqdm(total=total, initial=total - len(todo), unit="img", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, desc="prepare")
    with open(staging / JOURNAL_FILE, "a") as journal, bar:
        for record, png_bytes in _results(source, todo, transform, resolution, workers):
            if png_bytes is not None:
                _write_file_atomic(staging / archive_name(record["index"]), png_bytes)
            else:
                tqdm.write(f"ulbench: skipped {record['source']} ({record['skip']}: {record['error']})",
                           file=sys.stderr)
            journal.write(json.dumps(record, sort_keys=True) + "\n")
            journal.flush()
            bar.update(1)


def _manifest(source: Source, arguments: dict, records: dict[int, dict]) -> dict:
    done = [records[i] for i in sorted(records)]
    images = [{"name": archive_name(r["index"]), "source": r["source"], "source_sha256": r["source_sha256"],
               "pixels_sha256": r["pixels_sha256"],
               "label": None if source.labels is None else source.labels[r["index"]]}
              for r in done if "skip" not in r]
    skipped = {reason: [{k: r[k] for k in ("index", "source", "error", "source_sha256") if k in r}
                        for r in done if r.get("skip") == reason] for reason in SKIP_REASONS}
    labels = [im["label"] for im in images if im["label"] is not None]
    return {
        "format": FORMAT, "arguments": arguments, "resolution": arguments["resolution"],
        "transform": arguments["transform"], "class_names": source.class_names,
        "num_classes": max(labels) + 1 if labels else 1, "count": len(images),
        "had_alpha": sum(bool(r.get("had_alpha")) for r in done if "skip" not in r), "skipped": skipped,
        "fingerprint": dataset_fingerprint((im["name"], im["label"], im["pixels_sha256"]) for im in images),
        "images": images,
    }


def _manifest_text(manifest: dict) -> str:
    """Sorted, indented JSON with one image per line (ImageNet's 1.28M entries stay a readable file)."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "images"}, indent=2, sort_keys=True)
    rows = ",\n".join("    " + json.dumps(im, sort_keys=True) for im in manifest["images"])
    return head[:-2] + ',\n  "images": [\n' + rows + "\n  ]\n}\n"


def _write_metadata(staging: Path, source: Source, arguments: dict) -> None:
    manifest = _manifest(source, arguments, _read_journal(staging))
    if manifest["count"] == 0:
        reasons = {k: len(v) for k, v in manifest["skipped"].items() if v}
        shutil.rmtree(staging)
        raise UserError(f"SRC {arguments['source']}: no image could be prepared (skipped: {reasons}); "
                        f"see the messages above for each file")
    labelled = manifest["images"][0]["label"] is not None
    labels = [[im["name"], im["label"]] for im in manifest["images"]] if labelled else None
    _write_text_atomic(staging / LABELS_FILE, json.dumps({"labels": labels}))  # EDM2's exact dataset.json
    _write_text_atomic(staging / MANIFEST_FILE, _manifest_text(manifest))


def _dest_files(staging: Path) -> list[str]:
    names = [str(p.relative_to(staging)).replace(os.sep, "/") for p in staging.rglob("*") if p.is_file()]
    return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))


def _finalize(staging: Path, out: Path, is_zip: bool) -> None:
    if not is_zip:
        for name in (JOURNAL_FILE, ARGUMENTS_FILE):
            (staging / name).unlink(missing_ok=True)
        os.rename(staging, out)  # atomic; replaces an empty folder
        return
    tmp = staging / PACK_TMP_FILE
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in _dest_files(staging):  # sorted names, fixed dates and permissions: reproducible bytes
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.compress_type, info.external_attr = zipfile.ZIP_STORED, ZIP_EXTERNAL_ATTR
            info.create_system = ZIP_CREATE_SYSTEM_UNIX
            zf.writestr(info, (staging / name).read_bytes())
    os.replace(tmp, out)
    shutil.rmtree(staging)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest.json of a prepared folder or zip (None when it has none, e.g. a set written by EDM2's tool)."""
    path = Path(path)
    if path.is_dir():
        return json.loads((path / MANIFEST_FILE).read_text()) if (path / MANIFEST_FILE).is_file() else None
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(MANIFEST_FILE)) if MANIFEST_FILE in zf.namelist() else None


def _summary(out: Path, manifest: dict) -> dict:
    return {"out": str(out), "images": manifest["count"], "resolution": manifest["resolution"],
            "transform": manifest["transform"], "num_classes": manifest["num_classes"],
            "had_alpha": manifest["had_alpha"], "skipped": {k: len(v) for k, v in manifest["skipped"].items()},
            "fingerprint": manifest["fingerprint"]}


def _existing_dest(out: Path, is_zip: bool) -> dict | None:
    """The manifest of a complete DEST at ``out``; None if there is nothing there (or an empty folder)."""
    if not out.exists() or (out.is_dir() and not is_zip and not any(out.iterdir())):
        return None
    if is_zip != out.is_file():
        raise UserError(f"--out {out} exists and is not a {'zip file' if is_zip else 'folder'}")
    try:
        manifest = read_manifest(out)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"--out {out} exists and cannot be read ({e}); choose another --out or delete it") from None
    if manifest is None:
        raise UserError(f"--out {out} exists and is not a dataset prepared by ulbench (no {MANIFEST_FILE}); choose "
                        f"another --out or delete it")
    return manifest


def _check_arguments(src, out, resolution, transform, workers, max_images) -> tuple[dict, Path]:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise UserError(f"--resolution must be a positive integer (the side of the square output), got {resolution!r}")
    if transform not in TRANSFORMS:
        raise UserError(f"--transform {transform!r} is not one of {', '.join(TRANSFORMS)}")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {max_images}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not str(out):
        raise UserError("--out must name a folder or a .zip file")
    if not os.path.exists(src):
        raise UserError(f"SRC {src}: no such folder or file")
    source, dest = Path(os.path.abspath(src)), Path(os.path.abspath(out))
    if source.is_dir() and (dest == source or source in dest.parents):
        raise UserError(f"--out {out} lies inside SRC {src}: a rerun would list the prepared images as sources")
    return {"source": str(source), "resolution": resolution, "transform": transform, "max_images": max_images}, dest


def prepare(src: str | os.PathLike, out: str | os.PathLike, resolution: int, transform: str = DEFAULT_TRANSFORM,
            workers: int | None = None, max_images: int | None = None, progress: bool = True) -> dict:
    """Prepare SRC's images at ``resolution`` into DEST ``out`` (a folder, or a zip when it ends in .zip).

    Resumes an interrupted run with the same arguments; returns the summary of a complete DEST made with the same
    arguments without work; refuses (UserError) other arguments, and a source with no preparable image.
    """
    arguments, out = _check_arguments(src, out, resolution, transform, workers, max_images)
    is_zip, staging = out.name.lower().endswith(".zip"), out.with_name(out.name + STAGING_SUFFIX)
    existing = _existing_dest(out, is_zip)
    if existing is not None:
        if existing.get("arguments") != arguments:
            raise UserError(f"--out {out} already holds a dataset prepared with other arguments "
                            f"({_difference(existing.get('arguments') or {}, arguments)}); choose another --out or "
                            f"delete it")
        if staging.exists():
            shutil.rmtree(staging)  # what a run killed in its last step leaves
        return _summary(out, existing)
    source = Source(src)
    if not source.names:
        raise UserError(f"SRC {src}: no image files ({' '.join(IMAGE_EXTENSIONS)}) found")
    listing_sha256 = hashlib.sha256("\n".join(source.names).encode()).hexdigest()
    if staging.exists() and _staged_arguments(staging) is None and all(
            p.name.endswith(".tmp") for p in staging.iterdir()):
        shutil.rmtree(staging)  # a run killed while creating it, before its marker was written
    if staging.exists():
        _check_staging(staging, arguments, listing_sha256)
    else:
        staging.mkdir(parents=True)
        _write_text_atomic(staging / ARGUMENTS_FILE, json.dumps(
            {"arguments": arguments, "source_listing_sha256": listing_sha256}, indent=2, sort_keys=True))
    if not (staging / MANIFEST_FILE).is_file():
        for tmp in staging.glob("*/.*.tmp"):
            tmp.unlink()
        records = _read_journal(staging)
        selected = len(source) if max_images is None else min(max_images, len(source))
        todo = [i for i in range(selected) if i not in records
                or ("skip" not in records[i] and not (staging / archive_name(i)).is_file())]
        if todo:
            _run(staging, source, todo, selected, transform, resolution, workers or os.cpu_count() or 1, progress)
        _write_metadata(staging, source, arguments)
    _finalize(staging, out, is_zip)
    return _summary(out, read_manifest(out))


# ---- reading a prepared dataset ----

def _staging_error(path: Path) -> UserError:
    return UserError(f"{path} is an unfinished `ulbench data prepare` (a staging folder, not a dataset): "
                     f"{RERUN_HINT}")


def _refuse_unfinished(path: Path) -> None:
    if path.name.endswith(STAGING_SUFFIX) or (path.is_dir() and (
            (path / ARGUMENTS_FILE).exists() or (path / JOURNAL_FILE).exists())):
        raise _staging_error(path)
    if not path.exists():
        staging = path.with_name(path.name + STAGING_SUFFIX)
        if staging.exists():
            raise UserError(f"{path} does not exist yet: {staging} is its unfinished `ulbench data prepare`; "
                            f"{RERUN_HINT}")
        raise UserError(f"{path}: no such prepared dataset (folder or .zip)")


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder with dataset.json, manifest.json or a prepare staging marker, or a .zip with dataset.json or images
    (unfinished ones included: ``PreparedDataset`` refuses them with a message saying how to finish them)."""
    path = Path(path)
    if path.is_dir():
        markers = (LABELS_FILE, MANIFEST_FILE, ARGUMENTS_FILE, JOURNAL_FILE)
        return path.name.endswith(STAGING_SUFFIX) or any((path / m).is_file() for m in markers)
    if path.is_file() and path.name.lower().endswith(".zip") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return any(n == LABELS_FILE or n.lower().endswith(IMAGE_EXTENSIONS) for n in zf.namelist())
    return False


class PreparedDataset(ImageDataset):
    """A dataset in EDM2's layout, folder or zip: written by ``prepare`` (manifest.json) or by EDM2's own tool.

    Images are the .png/.jpg/... files sorted by name, as EDM2's ImageFolderDataset lists them; labels come from
    dataset.json (0 for all when it has none). Holds only the names and labels: images are decoded per item.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(path))
        _refuse_unfinished(self.path)
        self.is_zip = self.path.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.path):
            raise UserError(f"{path}: neither a folder nor a zip file")
        self._zip, self._zip_pid = None, None
        self.name = self.path.stem  # EDM2: splitext(basename(path))
        self.names = self._list_images()
        if not self.names:
            raise UserError(f"{path}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this prepared dataset")
        self.labelled, self.labels = self._read_labels()
        self.num_classes = int(self.labels.max()) + 1 if self.labelled else 1
        manifest = self._read_json(MANIFEST_FILE)
        if manifest is not None:
            self._check_manifest(manifest)
        self.resolution = manifest["resolution"] if manifest else self._first_image_side()
        self.class_names = manifest["class_names"] if manifest else None
        self._fingerprint = manifest["fingerprint"] if manifest else None  # an EDM2-written set: computed lazily

    def _list_images(self) -> list[str]:
        if self.is_zip:
            names = self._archive().namelist()
        else:
            names = [os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/")
                     for root, _dirs, files in os.walk(self.path) for f in files]
        return sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.endswith("/"))

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per process: fork shares file offsets
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _read(self, name: str) -> bytes:
        return self._archive().read(name) if self.is_zip else (self.path / name).read_bytes()

    def _read_json(self, name: str) -> dict | None:
        exists = name in self._archive().namelist() if self.is_zip else (self.path / name).is_file()
        return json.loads(self._read(name)) if exists else None

    def _read_labels(self) -> tuple[bool, np.ndarray]:
        table = (self._read_json(LABELS_FILE) or {}).get("labels")
        if table is None:
            return False, np.zeros(len(self.names), dtype=np.int64)
        by_name = dict((n, lab) for n, lab in table)
        missing = [n for n in self.names if n not in by_name]
        if missing:
            raise UserError(f"{self.path}: {LABELS_FILE} has no label for {len(missing)} image(s), e.g. {missing[0]}")
        return True, np.array([by_name[n] for n in self.names], dtype=np.int64)

    def _check_manifest(self, manifest: dict) -> None:
        if not str(manifest.get("format", "")).startswith(FORMAT.split("/")[0]):
            raise UserError(f"{self.path}: {MANIFEST_FILE} is not a ulbench prepare manifest")
        if manifest["count"] != len(self.names):
            raise UserError(f"{self.path}: {MANIFEST_FILE} lists {manifest['count']} images but {len(self.names)} "
                            f"are there: the dataset was modified; prepare it again into a new --out")

    def _decode(self, i: int) -> np.ndarray:
        data = self._read(self.names[i])
        fast = png.read_rgb(data)  # our own prepared PNGs; anything else (EDM2's, JPEG) through PIL
        if fast is not None:
            return fast
        try:
            return decode_rgb(data, self.names[i])[0]
        except UnreadableImage as e:
            raise UserError(f"{self.path}: {e}") from None

    def _first_image_side(self) -> int:
        h, w = self._decode(0).shape[:2]
        if h != w:
            raise UserError(f"{self.path}: {self.names[0]} is {w}x{h}; a prepared dataset holds square images "
                            f"(make one with `ulbench data prepare SRC --resolution R --out DEST`)")
        return h

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        rgb = self._decode(i)
        if rgb.shape != (self.resolution, self.resolution, 3):
            raise UserError(f"{self.path}: {self.names[i]} is {rgb.shape[1]}x{rgb.shape[0]}, the dataset is "
                            f"{self.resolution}x{self.resolution}")
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), int(self.labels[i])  # one copy

    def fingerprint(self) -> str:
        """The manifest's; for a set without one the same formula over every decoded image (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(
                (n, int(self.labels[i]) if self.labelled else None, pixels_sha256(self._decode(i)))
                for i, n in enumerate(self.names))
        return self._fingerprint
