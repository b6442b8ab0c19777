"""Small file helpers: atomic writes so that a killed process never leaves a half-written result."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ul_model.io import DiskFullError, atomic_write

__all__ = ["DiskFullError", "atomic_write", "fingerprint_id", "read_json", "read_json_lines", "write_json"]


def fingerprint_id(fp: object) -> str:
    """A result row's protocol identity (``ulbench check`` and reports compare these): the metric fingerprint's
    explicit id, else its fields without the inputs; plus the sampler that generated the images, when recorded."""
    fp = fp if isinstance(fp, dict) else {}
    ident = fp.get("id") or json.dumps({k: v for k, v in fp.items() if k not in ("inputs", "sampler")}, sort_keys=True)
    return ident if "sampler" not in fp else f"{ident} sampler {json.dumps(fp['sampler'], sort_keys=True)}"


def read_json(path: str | os.PathLike, missing: str) -> object:
    """The JSON document at ``path``; a missing file is a UserError ``"{path}: {missing}"`` (say what would make
    it), a damaged one a UserError naming the file and the parse error."""
    from ulbench.errors import UserError

    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not JSON ({e}); the file is damaged") from None


def read_json_lines(path: str | os.PathLike) -> list:
    """The rows of a JSON-lines file (blank lines skipped); a damaged line is a UserError naming file and line."""
    from ulbench.errors import UserError

    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not a JSON line ({e}); the run directory is damaged") from None
    return rows


def write_json(path: str | os.PathLike, obj: object) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ADM sample files (.npz, arr_0 uint8 NHWC) written by streaming per-rank part files into one stored zip entry,
# and read back as a memory map: numpy's own savez/load hold the whole array in memory (50k 512px images: 39 GB).
NPZ_MEMBER = "arr_0.npy"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp: the same images give the same file bytes


def write_npz_from_parts(path: str | os.PathLike, parts: list, chunk_items: int = 256) -> int:
    """Concatenate the ``.npy`` files ``parts`` (same dtype and item shape; empty ones skipped) along axis 0 into
    the ``.npz`` ``path`` (member ``arr_0``, stored), atomically; returns the number of items."""
    import zipfile

    import numpy as np

    arrays = [a for a in (np.load(p, mmap_mode="r") for p in parts) if len(a)]
    if not arrays:
        raise ValueError(f"{path}: no items in {len(parts)} part files")
    n = sum(len(a) for a in arrays)
    header = {"descr": np.lib.format.dtype_to_descr(arrays[0].dtype), "fortran_order": False,
              "shape": (n, *arrays[0].shape[1:])}
    with atomic_write(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            info = zipfile.ZipInfo(NPZ_MEMBER, date_time=_ZIP_EPOCH)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for a in arrays:
                    for i in range(0, len(a), chunk_items):
                        member.write(np.ascontiguousarray(a[i:i + chunk_items]).tobytes())
    return n


def open_npz_array(path: str | os.PathLike, member: str = NPZ_MEMBER):
    """``arr_0`` of an uncompressed ``.npz`` as a read-only memory map (numpy's ``np.load`` reads it whole);
    compressed files fall back to ``np.load``."""
    import struct
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as z:
            return z[member.removesuffix(".npy")]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = struct.unpack("<4s5H3L2H", f.read(30))  # the local file header: name and extra lengths last
        f.seek(info.header_offset + 30 + local[-2] + local[-1])
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: {member} is not a plain C-ordered array")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_journal(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines journal appended to as work finishes. A torn last line (a process killed while
    writing it) is cut off the file, so later appends start on a clean line."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return [json.loads(line) for line in complete.decode().splitlines() if line]

