"""`ulbench data prepare` and PreparedDataset on real photos: ADM's crop pixel-exact for every mode and format,
16-bit scaling, EDM2's labels and layout, resume after SIGKILL byte-identical, unreadable files, the CLI."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import run_cli
from ulbench.cli import main as cli_main
from ulbench.data import prepared
from ulbench.data.prepared import PreparedDataset, is_prepared, prepare
from ulbench.data.transforms import decode_rgb
from ulbench.errors import UserError

R = 32
PHOTOS = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
# (height, width): portrait and landscape of odd sizes, sources smaller than R (upscaled), one halved twice
SHAPES = [(131, 97), (89, 151), (23, 29), (29, 17), (301, 211), (64, 64), (45, 33)]
KILL_IMAGES = 300
KILL_SEED = 20240611


def _crop(i: int, shape: tuple[int, int]) -> np.ndarray:
    photo = PHOTOS[i % len(PHOTOS)]
    h, w = shape
    y, x = (37 * i) % (photo.shape[0] - h), (53 * i) % (photo.shape[1] - w)
    return np.ascontiguousarray(photo[y: y + h, x: x + w])


def adm_reference(rgb: np.ndarray, size: int) -> np.ndarray:
    """ADM's center_crop_arr written out again: BOX-halve while the short side >= 2R, one BICUBIC resize with
    rounded sizes so the short side is R, integer center crop."""
    img = Image.fromarray(rgb)
    while min(img.width, img.height) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.width, img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    a = np.array(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size]


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (gray / gray+alpha / RGB / RGBA by channel count) written by hand (Pillow cannot write 16-bit
    colour); rows cycle through the filters None, Sub, Up, Average so the decoder's unfiltering is exercised."""
    h, w, c = samples.shape
    bpp = 2 * c
    raw = np.frombuffer(samples.astype(">u2").tobytes(), np.uint8).reshape(h, w * bpp).astype(np.int32)
    rows, prev = [], np.zeros(w * bpp, np.int32)
    for y in range(h):
        left = np.concatenate([np.zeros(bpp, np.int32), raw[y, :-bpp]])
        pred = [0, left, prev, (left + prev) // 2][y % 4]
        rows.append(bytes([y % 4]) + ((raw[y] - pred) % 256).astype(np.uint8).tobytes())
        prev = raw[y]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def _alpha(shape) -> np.ndarray:
    h, w = shape
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w)).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def mode_files(folder: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """Real photo crops in every mode and format; -> ({file: the RGB image ADM decodes}, files with alpha)."""
    folder.mkdir(parents=True)
    cases = {  # name -> (bytes from an RGB crop, alpha?)
        "rgb.png": (lambda a: _save(Image.fromarray(a), "PNG"), False),
        "rgb.bmp": (lambda a: _save(Image.fromarray(a), "BMP"), False),
        "rgb.jpg": (lambda a: _save(Image.fromarray(a), "JPEG", quality=90), False),
        "RGB_UPPER.JPEG": (lambda a: _save(Image.fromarray(a), "JPEG", quality=75), False),
        "rgb_lossy.webp": (lambda a: _save(Image.fromarray(a), "WEBP", quality=80), False),
        "rgb_lossless.webp": (lambda a: _save(Image.fromarray(a), "WEBP", lossless=True), False),
        "l.png": (lambda a: _save(Image.fromarray(a).convert("L"), "PNG"), False),
        "l.jpeg": (lambda a: _save(Image.fromarray(a).convert("L"), "JPEG"), False),
        "la.png": (lambda a: _save(Image.fromarray(np.dstack([np.array(Image.fromarray(a).convert("L")),
                                                              _alpha(a.shape[:2])]), "LA"), "PNG"), True),
        "p.png": (lambda a: _save(Image.fromarray(a).quantize(64), "PNG"), False),
        "p.bmp": (lambda a: _save(Image.fromarray(a).quantize(16), "BMP"), False),
        "p_transparent.png": (lambda a: _save(Image.fromarray(a).quantize(32), "PNG", transparency=3), True),
        "rgba.png": (lambda a: _save(Image.fromarray(np.dstack([a, _alpha(a.shape[:2])])), "PNG"), True),
        "rgba.webp": (lambda a: _save(Image.fromarray(np.dstack([a, _alpha(a.shape[:2])])), "WEBP",
                                      lossless=True), True),
        "cmyk.jpg": (lambda a: _save(Image.fromarray(a).convert("CMYK"), "JPEG", quality=90), False),
        "one.png": (lambda a: _save(Image.fromarray(a).convert("1"), "PNG"), False),
        "one.bmp": (lambda a: _save(Image.fromarray(a).convert("1"), "BMP"), False),
    }
    expected, with_alpha = {}, set()
    for i, (name, (write, alpha)) in enumerate(cases.items()):
        data = write(_crop(i, SHAPES[i % len(SHAPES)]))
        (folder / name).write_bytes(data)
        expected[name] = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # ADM: Image.open().convert("RGB")
        with_alpha |= {name} if alpha else set()
    # 16-bit: written as v8 * 257, so each must decode to exactly its 8-bit original
    for j, (name, channels) in enumerate([("gray16.png", 1), ("rgb16.png", 3), ("rgba16.png", 4), ("la16.png", 2)]):
        rgb = _crop(len(cases) + j, SHAPES[(len(cases) + j) % len(SHAPES)])
        gray = np.array(Image.fromarray(rgb).convert("L"))
        v8 = {1: gray[..., None], 2: np.dstack([gray, _alpha(gray.shape)]), 3: rgb,
              4: np.dstack([rgb, _alpha(gray.shape)])}[channels]
        v16 = v8.astype(np.uint16) * 257
        if name == "gray16.png":  # Pillow writes 16-bit gray itself (mode I;16)
            (folder / name).write_bytes(_save(Image.fromarray(v16[..., 0]), "PNG"))
        else:
            (folder / name).write_bytes(png16(v16))
        expected[name] = np.repeat(gray[..., None], 3, -1) if channels < 3 else rgb
        with_alpha |= {name} if channels in (2, 4) else set()
    return expected, with_alpha


# 1. ADM crop, pixel-exact, every mode and format -----------------------------------------------------------------

def test_adm_crop_pixel_exact_every_mode_and_format(tmp_path):
    expected, with_alpha = mode_files(tmp_path / "src")
    summary = prepare(tmp_path / "src", tmp_path / "out", R, workers=1, progress=False)
    assert summary["images"] == len(expected) and summary["skipped"] == {"unreadable": 0, "too-small": 0}
    ds = PreparedDataset(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["had_alpha"] == len(with_alpha) == summary["had_alpha"]
    names = sorted(expected)
    assert [im["source"] for im in manifest["images"]] == names
    assert len(ds) == len(names) and ds.resolution == R and ds.num_classes == 1
    for i, name in enumerate(names):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, R, R) and y == 0
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), adm_reference(expected[name], R), err_msg=name)
        source_sha256 = hashlib.sha256((tmp_path / "src" / name).read_bytes()).hexdigest()
        assert manifest["images"][i]["source_sha256"] == source_sha256
    # the reference can tell crops apart: the twice-halved source differs from a single BICUBIC resize
    big = _crop(0, (301, 211))
    one_step = np.array(Image.fromarray(big).resize((R, round(301 * R / 211)), Image.BICUBIC))
    top = (one_step.shape[0] - R) // 2
    assert not np.array_equal(one_step[top: top + R], adm_reference(big, R))


def test_edm2_center_crop_and_wide(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shapes = {"a_portrait.png": (97, 61), "b_landscape.png": (61, 131), "c_narrow.png": (40, 24),
              "d_flat.png": (20, 90), "e_tall.png": (120, 40)}
    arrays = {n: _crop(i, s) for i, (n, s) in enumerate(shapes.items())}
    for n, a in arrays.items():
        Image.fromarray(a).save(src / n)
    prepare(src, tmp_path / "cc", R, transform="center-crop", workers=1, progress=False)
    wide = prepare(src, tmp_path / "wide", R, transform="center-crop-wide", workers=1, progress=False)
    cc = PreparedDataset(tmp_path / "cc")
    for i, n in enumerate(sorted(arrays)):  # EDM2 center_crop: centered square, LANCZOS
        a = arrays[n]
        h, w = a.shape[:2]
        c = min(h, w)
        ref = np.array(Image.fromarray(a[(h - c) // 2: (h + c) // 2, (w - c) // 2: (w + c) // 2]).resize(
            (R, R), Image.LANCZOS))
        np.testing.assert_array_equal(cc[i][0].permute(1, 2, 0).numpy(), ref, err_msg=n)
    # EDM2 center_crop_wide: ch = round(R h / w); skip when w < R or ch < R (with a square output: every
    # landscape source, and sources narrower than R)
    kept = ["a_portrait.png", "e_tall.png"]
    manifest = json.loads((tmp_path / "wide" / "manifest.json").read_text())
    assert wide["skipped"] == {"unreadable": 0, "too-small": 3}
    assert [s["source"] for s in manifest["skipped"]["too-small"]] == ["b_landscape.png", "c_narrow.png", "d_flat.png"]
    assert [im["name"] for im in manifest["images"]] == ["00000/img00000000.png", "00000/img00000004.png"]
    ds = PreparedDataset(tmp_path / "wide")
    for i, n in enumerate(kept):
        a = arrays[n]
        h, w = a.shape[:2]
        ch = round(R * h / w)
        ref = np.array(Image.fromarray(a[(h - ch) // 2: (h + ch) // 2]).resize((R, R), Image.LANCZOS))
        np.testing.assert_array_equal(ds[i][0].permute(1, 2, 0).numpy(), ref, err_msg=n)


# 2. 16-bit is scaled ----------------------------------------------------------------------------------------------

def test_16bit_png_scaled_to_its_8bit_original():
    rgb = _crop(3, (41, 37))
    np.testing.assert_array_equal(decode_rgb(png16(rgb.astype(np.uint16) * 257))[0], rgb)
    gray = np.array(Image.fromarray(rgb).convert("L"))
    data = _save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    np.testing.assert_array_equal(decode_rgb(data)[0], np.repeat(gray[..., None], 3, -1))
    # arbitrary 16-bit values: round(v / 257), not Pillow's default (high byte for colour, clipping for gray)
    v = np.random.default_rng(0).integers(0, 65536, (23, 19, 3))
    want = np.round(v / 257).astype(np.uint8)
    got = decode_rgb(png16(v))[0]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(np.array(Image.open(io.BytesIO(png16(v)))), want)
    got_gray = decode_rgb(_save(Image.fromarray(v[..., 0].astype(np.uint16)), "PNG"))[0]
    np.testing.assert_array_equal(got_gray, np.repeat(want[..., :1], 3, -1))


# 3. labels and archive sources ------------------------------------------------------------------------------------

def _class_tree(root: Path, per_class: int = 3) -> dict[str, np.ndarray]:
    arrays = {}
    for k, cls in enumerate(["zebra", "apple", "mango"]):  # created out of sorted order
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            rel = f"{cls}/{j:02d}.{'jpg' if j % 2 else 'png'}"
            arrays[rel] = _crop(3 * k + j, SHAPES[(3 * k + j) % len(SHAPES)])
            Image.fromarray(arrays[rel]).save(root / rel)
    return arrays


def _dest_files(out: Path) -> dict[str, bytes]:
    if out.is_file():
        with zipfile.ZipFile(out) as zf:
            return {n: zf.read(n) for n in zf.namelist()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _without_arguments(files: dict[str, bytes]) -> dict[str, bytes]:
    m = json.loads(files["manifest.json"])
    del m["arguments"]  # the source path differs between the folder and the archives
    return files | {"manifest.json": json.dumps(m, sort_keys=True).encode()}


def test_labels_sorted_class_folders_flat_unlabelled_archives_same(tmp_path):
    arrays = _class_tree(tmp_path / "tree")
    prepare(tmp_path / "tree", tmp_path / "out", R, workers=1, progress=False)
    ds = PreparedDataset(tmp_path / "out")
    want = [{"apple": 0, "mango": 1, "zebra": 2}[rel.split("/")[0]] for rel in sorted(arrays)]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == want and ds.num_classes == 3
    assert ds.class_names == ["apple", "mango", "zebra"]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["labels"][0] == ["00000/img00000000.png", 0] and [y for _, y in meta["labels"]] == want
    assert [ds[i][1] for i in range(len(ds))] == want

    flat = tmp_path / "flat"
    flat.mkdir()
    for rel in arrays:
        shutil.copy(tmp_path / "tree" / rel, flat / rel.replace("/", "_"))
    prepare(flat, tmp_path / "flat_out", R, workers=1, progress=False)
    assert json.loads((tmp_path / "flat_out" / "dataset.json").read_text()) == {"labels": None}
    flat_ds = PreparedDataset(tmp_path / "flat_out")
    assert flat_ds.num_classes == 1 and flat_ds.labels.tolist() == [0] * len(arrays)

    with zipfile.ZipFile(tmp_path / "tree.zip", "w") as zf:
        for rel in reversed(sorted(arrays)):  # archive order is not the listing order
            zf.write(tmp_path / "tree" / rel, rel)
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        with tarfile.open(tmp_path / f"tree{suffix}", mode) as tf:
            tf.add(tmp_path / "tree", arcname=".")
    reference = _without_arguments(_dest_files(tmp_path / "out"))
    for archive in ("tree.zip", "tree.tar", "tree.tar.gz"):
        out = tmp_path / f"from_{archive}"
        prepare(tmp_path / archive, out, R, workers=2, progress=False)
        assert _without_arguments(_dest_files(out)) == reference, archive


# 4. EDM2-written datasets; folder and zip DEST read alike ----------------------------------------------------------

def write_edm2_dataset(dest: Path, images: list[np.ndarray], labels: list[int] | None) -> None:
    """EDM2 dataset_tool.py's documented layout: 00000/img00000000.png (uncompressed PNG) and dataset.json
    {"labels": [[name, label], ...]} (or null), as a folder or a ZIP_STORED zip."""
    files, table = {}, []
    for idx, img in enumerate(images):
        s = f"{idx:08d}"
        name = f"{s[:5]}/img{s}.png"
        files[name] = _save(Image.fromarray(img), "PNG", compress_level=0, optimize=False)
        table.append([name, labels[idx]] if labels is not None else None)
    files["dataset.json"] = json.dumps({"labels": table if labels is not None else None}).encode()
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)


def _items(ds) -> list[tuple[np.ndarray, int]]:
    return [(x.numpy(), y) for x, y in (ds[i] for i in range(len(ds)))]


def test_edm2_written_dataset_loads_folder_and_zip_alike(tmp_path):
    images = [adm_reference(_crop(i, SHAPES[i % len(SHAPES)]), R) for i in range(12)]
    labels = [(5 * i) % 7 for i in range(12)]
    for dest in (tmp_path / "edm2", tmp_path / "edm2.zip"):
        write_edm2_dataset(dest, images, labels)
    a, b = PreparedDataset(tmp_path / "edm2"), PreparedDataset(tmp_path / "edm2.zip")
    for ds in (a, b):
        assert is_prepared(ds.path) and ds.name == "edm2" and ds.resolution == R and len(ds) == 12
        assert ds.labels.tolist() == labels and ds.num_classes == max(labels) + 1
        for i, (x, y) in enumerate(_items(ds)):
            np.testing.assert_array_equal(x.transpose(1, 2, 0), images[i])
            assert y == labels[i]
    lines = []
    for i in range(12):
        pixels = hashlib.sha256(f"{R}x{R}x3\n".encode() + images[i].tobytes()).hexdigest()
        lines.append(f"{f'{i:08d}'[:5]}/img{i:08d}.png\t{labels[i]}\t{pixels}\n")
    want = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert a.fingerprint() == b.fingerprint() == want
    b[3]  # opens the zip; a pickled copy (DataLoader workers) reopens its own
    clone = pickle.loads(pickle.dumps(b))
    assert clone._zip is None and np.array_equal(clone[3][0].numpy(), b[3][0].numpy())
    write_edm2_dataset(tmp_path / "edm2_unlabelled.zip", images, None)
    u = PreparedDataset(tmp_path / "edm2_unlabelled.zip")
    assert u.num_classes == 1 and u.labels.tolist() == [0] * 12

    # our own DEST, folder and zip, reads identically; its manifest fingerprint = the formula over the pixels
    _class_tree(tmp_path / "tree")
    prepare(tmp_path / "tree", tmp_path / "ours", R, workers=1, progress=False)
    prepare(tmp_path / "tree", tmp_path / "ours.zip", R, workers=1, progress=False)
    f, z = PreparedDataset(tmp_path / "ours"), PreparedDataset(tmp_path / "ours.zip")
    assert all(np.array_equal(p[0], q[0]) and p[1] == q[1] for p, q in zip(_items(f), _items(z)))
    assert f.fingerprint() == z.fingerprint() and (f.num_classes, f.resolution) == (z.num_classes, z.resolution)
    shutil.copytree(tmp_path / "ours", tmp_path / "no_manifest")
    (tmp_path / "no_manifest" / "manifest.json").unlink()
    assert PreparedDataset(tmp_path / "no_manifest").fingerprint() == f.fingerprint()


# 5. SIGKILL at a random point, resume byte-identical ---------------------------------------------------------------

def _kill_tree(root: Path, n: int) -> None:
    rng = np.random.default_rng(KILL_SEED)
    for i in range(n):
        shape = (int(rng.integers(24, 72)), int(rng.integers(24, 72)))
        path = root / ["dog", "cat", "bird"][i % 3] / f"{i:04d}.{'png' if i % 4 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_crop(i, shape)).save(path)


def _journal_lines(staging: Path) -> int:
    try:
        return (staging / prepared.JOURNAL_FILE).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_when(pid: int, alive, staging: Path, target: int, delay_s: float) -> int:
    """SIGKILL the process group once the journal has ``target`` lines (+ a random delay); -> lines at the kill."""
    deadline = time.monotonic() + 120
    while _journal_lines(staging) < target:
        assert alive(), "prepare ended before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(delay_s)
    os.killpg(pid, signal.SIGKILL)
    return _journal_lines(staging)


def _forked_prepare(src: Path, out: Path) -> None:
    os.setpgrp()  # its pool workers join its process group: one killpg ends them all
    sys.stderr = open(os.devnull, "w")
    prepare(src, out, R, workers=2, progress=False)


def _fork_and_kill(src: Path, out: Path, target: int, delay_s: float) -> int:
    proc = multiprocessing.get_context("fork").Process(target=_forked_prepare, args=(src, out))
    proc.start()
    at = _kill_when(proc.pid, proc.is_alive, out.with_name(out.name + ".partial"), target, delay_s)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    return at


def test_sigkill_resume_byte_identical(tmp_path):
    rng = np.random.default_rng(KILL_SEED)
    src = tmp_path / "src"
    _kill_tree(src, KILL_IMAGES)
    ref_zip, ref_dir = tmp_path / "ref.zip", tmp_path / "ref"
    reference = prepare(src, ref_zip, R, workers=1, progress=False)
    prepare(src, ref_dir, R, workers=1, progress=False)

    # zip DEST: killed once through the CLI in a subprocess and once in a forked prepare, finished by the CLI
    out = tmp_path / "killed.zip"
    staging = tmp_path / "killed.zip.partial"
    cmd = [sys.executable, "-m", "ulbench.cli", "data", "prepare", str(src), "--resolution", str(R), "--out",
           str(out), "--workers", "2", "--json"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = _kill_when(proc.pid, lambda: proc.poll() is None, staging, int(rng.integers(10, 120)),
                       float(rng.uniform(0, 0.01)))
    assert proc.wait() == -signal.SIGKILL and not out.exists()
    _fork_and_kill(src, out, first + int(rng.integers(10, 120)), float(rng.uniform(0, 0.01)))
    assert not out.exists() and staging.is_dir()
    with pytest.raises(UserError, match="rerun"):
        PreparedDataset(staging)
    with pytest.raises(UserError, match="unfinished"):
        PreparedDataset(out)
    done = run_cli(*cmd[3:])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == reference | {"out": str(out)}
    assert out.read_bytes() == ref_zip.read_bytes() and not staging.exists()

    # folder DEST: killed in a forked prepare, resumed in this process with one worker
    out_dir = tmp_path / "killed"
    _fork_and_kill(src, out_dir, int(rng.integers(10, 200)), float(rng.uniform(0, 0.01)))
    prepare(src, out_dir, R, workers=1, progress=False)
    assert _dest_files(out_dir) == _dest_files(ref_dir)
    assert not (tmp_path / "killed.partial").exists()


def test_resume_paths_and_changed_arguments_refused(tmp_path, monkeypatch):
    _class_tree(tmp_path / "src", per_class=4)
    prepare(tmp_path / "src", tmp_path / "ref", R, workers=1, progress=False)
    out, staging = tmp_path / "out", tmp_path / "out.partial"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared, "_write_metadata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "src", out, R, workers=1, progress=False)
    monkeypatch.undo()
    # the states a kill leaves: a partial last journal line, a half-written PNG tmp, a PNG without journal line
    with open(staging / prepared.JOURNAL_FILE, "ab") as f:
        f.write(b'{"index": 3, "sou')
    (staging / "00000" / ".img00000005.png.tmp").write_bytes(b"\x89PNG partial")
    (staging / "00000" / "img00000007.png").unlink()
    for kw, needle in [({"resolution": 64}, "resolution"), ({"transform": "center-crop"}, "transform"),
                       ({"max_images": 5}, "max_images")]:
        args = {"resolution": R} | kw
        with pytest.raises(UserError, match=needle):
            prepare(tmp_path / "src", out, workers=1, progress=False, **args)
    shutil.copytree(tmp_path / "src", tmp_path / "src2")
    with pytest.raises(UserError, match="source"):
        prepare(tmp_path / "src2", out, R, workers=1, progress=False)
    prepare(tmp_path / "src", out, R, workers=1, progress=False)
    assert _dest_files(out) == _dest_files(tmp_path / "ref") and not staging.exists()
    # a complete DEST: same arguments return its summary, other arguments are refused
    assert prepare(tmp_path / "src", out, R, workers=1, progress=False)["images"] == 12
    with pytest.raises(UserError, match="resolution"):
        prepare(tmp_path / "src", out, 64, workers=1, progress=False)
    # killed between creating the staging folder and writing its marker: started afresh
    (tmp_path / "fresh.partial").mkdir()
    (tmp_path / "fresh.partial" / ".marker.json.tmp").write_text("{")
    assert prepare(tmp_path / "src", tmp_path / "fresh", R, workers=1, progress=False)["images"] == 12
    # max_images takes the first N sources
    small = prepare(tmp_path / "src", tmp_path / "first5", R, workers=1, max_images=5, progress=False)
    assert small["images"] == 5 and PreparedDataset(tmp_path / "first5").labels.tolist() == [0, 0, 0, 0, 1]


# 6. unreadable files -----------------------------------------------------------------------------------------------

def test_unreadable_files_named_counted_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_crop(i, (50, 70))).save(src / f"good{i}.jpg")
    jpeg = (src / "good1.jpg").read_bytes()
    (src / "bad_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (src / "bad_text.png").write_text("this is not a png\n")
    (src / "notes.txt").write_text("not an image name: not listed")
    summary = prepare(src, tmp_path / "out", R, workers=2, progress=False)
    assert summary["images"] == 4 and summary["skipped"] == {"unreadable": 2, "too-small": 0}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    bad = {s["source"]: s for s in manifest["skipped"]["unreadable"]}
    assert set(bad) == {"bad_text.png", "bad_truncated.jpg"}
    assert all(s["error"] for s in bad.values())
    # sorted listing: bad_text.png 0, bad_truncated.jpg 1, good0..3 -> 2..5: the skipped files leave a gap
    assert [im["name"] for im in manifest["images"]] == [prepared.archive_name(i) for i in range(2, 6)]
    ds = PreparedDataset(tmp_path / "out")
    assert len(ds) == 4
    np.testing.assert_array_equal(ds[0][0].permute(1, 2, 0).numpy(),
                                  adm_reference(np.array(Image.open(src / "good0.jpg").convert("RGB")), R))
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(src / "bad_text.png", only_bad)
    shutil.copy(src / "bad_truncated.jpg", only_bad)
    with pytest.raises(UserError, match="no image could be prepared"):
        prepare(only_bad, tmp_path / "none.zip", R, workers=1, progress=False)
    assert not (tmp_path / "none.zip").exists() and not (tmp_path / "none.zip.partial").exists()


# 7. the CLI --------------------------------------------------------------------------------------------------------

def test_cli_bad_arguments_exit_2_without_traceback(tmp_path, capsys):
    _class_tree(tmp_path / "src", per_class=1)
    proc = run_cli("data", "prepare", str(tmp_path / "src"), "--resolution", "0", "--out", str(tmp_path / "o.zip"))
    assert proc.returncode == 2 and "--resolution" in proc.stderr and "Traceback" not in proc.stderr
    for argv, needle in [(["data", "prepare", str(tmp_path / "missing"), "--resolution", "32", "--out",
                           str(tmp_path / "o")], "SRC"),
                         (["data", "prepare", str(tmp_path / "src"), "--resolution", "32", "--out",
                           str(tmp_path / "src" / "inside")], "--out"),
                         (["data", "prepare", str(tmp_path / "src"), "--resolution", "32", "--out",
                           str(tmp_path / "o"), "--max-images", "0"], "--max-images")]:
        assert cli_main(argv) == 2
        assert needle in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["data", "prepare", str(empty), "--resolution", "32", "--out", str(tmp_path / "e")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: an unknown transform names the argument
        cli_main(["data", "prepare", str(tmp_path / "src"), "--resolution", "32", "--out", "o", "--transform", "x"])
    assert e.value.code == 2 and "--transform" in capsys.readouterr().err
    assert cli_main(["data", "prepare", str(tmp_path / "src"), "--resolution", "32", "--out",
                     str(tmp_path / "ok"), "--workers", "1"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out


def test_prepared_pngs_are_plain_pngs_that_the_fast_reader_decodes_exactly():
    """What prepare writes (stored, unfiltered) decodes to the same pixels through PIL and through the one-call
    fast path; PNGs written by PIL (filtered, as EDM2's tool writes them) are left to PIL."""
    from ulbench.data import png

    rgb = PHOTOS[1][40:137, 10:71]  # a real photo crop of odd sizes
    data = png.write_rgb(np.ascontiguousarray(rgb))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)
    assert np.array_equal(png.read_rgb(data), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=0)
    assert png.read_rgb(buf.getvalue()) is None  # PIL filters rows: not ours to unfilter
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(buf, format="PNG")
    assert png.read_rgb(buf.getvalue()) is None  # grayscale
