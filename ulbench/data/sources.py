"""Listing the SRC of ``ulbench data prepare``: a folder (ImageFolder tree or flat), or a .zip / .tar / .tar.gz of one.

A ``Source`` holds the sorted relative paths ('/'-separated) of the image files, their labels and class names, and
reads one file's bytes by name. Labels follow EDM2's dataset_tool.py: a ``dataset.json`` at the source's root with
non-null labels wins; else each file's top-level directory name ('' at the root), and if there is more than one
distinct name, the label is the name's index in sorted order (the class names are kept); else unlabelled.
Archives are opened lazily, once per process: a ``Source`` is pickled to worker processes without open handles.
"""
from __future__ import annotations

import functools
import json
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ulbench.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ZIP_SUFFIXES = (".zip",)
PLAIN_TAR_SUFFIXES = (".tar",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz")
EDM2_LABELS_FILE = "dataset.json"  # EDM2's {"labels": [[relative path, label], ...]} at the dataset root
IGNORED_DIR_NAMES = frozenset({"__MACOSX"})  # macOS zip resource forks (also: any name starting with '.')


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _ignored(rel: str) -> bool:
    return any(part.startswith(".") or part in IGNORED_DIR_NAMES for part in rel.split("/"))


def _kind(path: Path) -> str:
    low = path.name.lower()
    if path.is_dir():
        return "folder"
    if low.endswith(ZIP_SUFFIXES):
        return "zip"
    if low.endswith(PLAIN_TAR_SUFFIXES):
        return "tar"
    if low.endswith(COMPRESSED_TAR_SUFFIXES):
        return "tar-stream"
    raise UserError(f"SRC {path}: not a folder, .zip, .tar, .tar.gz or .tgz (the inputs `ulbench data prepare` reads)")


def _tar_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _list_folder(root: Path) -> tuple[list[str], bytes | None]:
    """Relative paths of every file, following links to folders but entering each real folder once: a link loop
    (``a/up -> ..``) would otherwise list the tree again at every level the kernel resolves (40 copies)."""
    rels, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") or d in IGNORED_DIR_NAMES))  # stable order
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rels += [f if rel_dir == "." else f"{rel_dir}/{f}" for f in filenames]
    meta = root / EDM2_LABELS_FILE
    return rels, meta.read_bytes() if meta.is_file() else None


def _list_zip(path: Path) -> tuple[list[str], bytes | None]:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        return names, zf.read(EDM2_LABELS_FILE) if EDM2_LABELS_FILE in names else None


def _list_tar(path: Path) -> tuple[list[str], bytes | None, dict[str, tuple[int, int]]]:
    """Names, dataset.json bytes and {name: (data offset, size)} in the (decompressed) tar stream."""
    members, meta = {}, None
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if m.isreg() and not m.issparse():
                members[_tar_name(m)] = (m.offset_data, m.size)
                if _tar_name(m) == EDM2_LABELS_FILE:
                    meta = tf.extractfile(m).read()
    return list(members), meta, members


def _labels(names: list[str], meta: bytes | None) -> tuple[list[int] | None, list[str] | None]:
    """EDM2 dataset_tool.py: dataset.json labels if present and complete, else top-level directory names."""
    if meta is not None:
        table = json.loads(meta).get("labels")
        if table is not None:
            by_name = {n: lab for n, lab in table}
            labels = [by_name.get(n) for n in names]
            if all(isinstance(lab, int) for lab in labels):
                return labels, None
            return None, None  # EDM2 writes "labels": null when any image lacks one
    top = [n.split("/")[0] if "/" in n else "" for n in names]
    class_names = sorted(set(top))
    if len(class_names) <= 1:
        return None, None
    index = {c: i for i, c in enumerate(class_names)}
    return [index[t] for t in top], class_names


class Source:
    """The image files of a SRC (sorted relative paths), their labels, and ``read(name) -> bytes``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(path))
        if not self.path.exists():
            raise UserError(f"SRC {path}: no such folder or file")
        self.kind = _kind(self.path)
        offsets = None
        if self.kind == "folder":
            rels, meta = _list_folder(self.path)
        elif self.kind == "zip":
            rels, meta = _open_checked(_list_zip, self.path)
        else:
            rels, meta, offsets = _open_checked(_list_tar, self.path)
        self.names = sorted(r for r in rels if is_image_name(r) and not _ignored(r))
        self.labels, self.class_names = _labels(self.names, meta)
        self._offsets = None if offsets is None else {n: offsets[n] for n in self.names}
        self._handle, self._pid = None, None

    @property
    def sequential(self) -> bool:
        """True for compressed tars: read them in archive order with ``stream`` (random access re-decompresses)."""
        return self.kind == "tar-stream"

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _handle=None, _pid=None)

    def _archive(self):
        if self._handle is None or self._pid != os.getpid():  # a handle inherited through fork is not ours
            self._handle = zipfile.ZipFile(self.path) if self.kind == "zip" else tarfile.open(self.path, "r:*")
            self._pid = os.getpid()
        return self._handle

    def read(self, name: str) -> bytes:
        if self.kind == "folder":
            return (self.path / name).read_bytes()
        if self.kind == "zip":
            return self._archive().read(name)
        offset, size = self._offsets[name]
        f = self._archive().fileobj
        f.seek(offset)
        return f.read(size)

    def items(self) -> list[tuple[str, Callable[[], bytes]]]:
        """(relative path, opener returning the file's bytes), sorted by relative path."""
        return [(n, functools.partial(self.read, n)) for n in self.names]

    def stream(self, wanted: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the wanted files in archive order: one pass, for compressed tars."""
        wanted = set(wanted)
        if self.kind != "tar-stream":
            yield from ((n, self.read(n)) for n in self.names if n in wanted)
            return
        with tarfile.open(self.path, "r|*") as tf:
            for m in tf:
                if m.isreg() and _tar_name(m) in wanted:
                    wanted.discard(_tar_name(m))  # a name stored twice: once
                    yield _tar_name(m), tf.extractfile(m).read()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None


def _open_checked(lister, path: Path):
    try:
        return lister(path)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"SRC {path}: cannot read the archive ({type(e).__name__}: {e})") from None
