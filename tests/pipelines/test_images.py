"""The one loader: every odd file is either converted to RGB correctly or rejected with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from featscope.pipelines.core.images import DEFAULT_MAX_PIXELS, BadImage, decode_pixels, open_image, read_pixels


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def gradient(w=40, h=30):
    x = np.linspace(0, 255, w, dtype=np.float64)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None]
    return np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), np.full((h, w), 90.0)], -1).astype(np.uint8)


def test_rgb_png_is_returned_unchanged(tmp_path):
    arr = gradient()
    img = open_image(save(Image.fromarray(arr), tmp_path / "a.png"))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = gradient()[..., 0]
    out = np.asarray(open_image(save(Image.fromarray(gray), tmp_path / "g.png")))
    assert out.shape == (30, 40, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))


def test_16bit_png_is_scaled_to_8bit_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(open_image(path))[..., 0]
    assert out.tolist() == [[0, 100, 255]]


def test_rgba_is_flattened_onto_white(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[1, 1] = (200, 0, 0, 0)  # fully transparent
    out = np.asarray(open_image(save(Image.fromarray(arr, "RGBA"), tmp_path / "alpha.png")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]


def test_palette_and_cmyk_are_converted(tmp_path):
    rgb = Image.fromarray(gradient())
    pal = open_image(save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), tmp_path / "p.png"))
    assert pal.mode == "RGB" and pal.size == (40, 30)
    cmyk = open_image(save(rgb.convert("CMYK"), tmp_path / "c.jpg", quality=95))
    assert cmyk.mode == "RGB"
    assert np.abs(np.asarray(cmyk, dtype=int) - gradient().astype(int)).mean() < 8


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(gradient(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert open_image(path).size == (30, 40)


def test_jpeg_draft_keeps_both_sides_at_least_the_requested_size(tmp_path):
    path = save(Image.fromarray(gradient(1200, 900)), tmp_path / "big.jpg")
    img = open_image(path, min_size=256)
    assert min(img.size) >= 256 and img.size[0] < 1200  # decoded at a reduced DCT scale


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not an image\n"), "not an image"),
        (lambda p: p.write_bytes(_jpeg_bytes()[:600]), "cannot decode"),
    ],
    ids=["zero-bytes", "text-named-jpg", "truncated-jpeg"],
)
@pytest.mark.parametrize("loader", [open_image, read_pixels])
def test_unreadable_files_raise_bad_image_with_a_reason(tmp_path, make, reason, loader):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(BadImage, match=reason):
        loader(path)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient(200, 150)).save(buf, format="JPEG")
    return buf.getvalue()


def test_images_over_the_pixel_limit_are_refused(tmp_path):
    path = save(Image.fromarray(gradient(40, 30)), tmp_path / "a.png")
    with pytest.raises(BadImage, match="too large: 40x30"):
        open_image(path, max_pixels=1000)


@pytest.mark.slow
def test_a_real_decompression_bomb_is_refused_at_pillows_default_limit(tmp_path):
    side = int(DEFAULT_MAX_PIXELS**0.5) + 100
    path = save(Image.new("1", (side, side)), tmp_path / "bomb.png")
    with pytest.raises(BadImage, match="too large"):
        open_image(path)


def test_read_pixels_matches_open_image_on_every_decoder_path(tmp_path):
    """JPEGs and opaque 8-bit PNGs go to torchvision's decoders, everything else through Pillow:
    the same pixels either way (PNG exactly)."""
    arr = gradient(300, 200)
    noisy = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    rgba = np.dstack([noisy, np.where(noisy[..., :1] > 128, 255, 40).astype(np.uint8)])
    grey_with_transparency = Image.fromarray(noisy[..., 0])
    grey_with_transparency.info["transparency"] = 7
    cases = {
        "rgb.jpg": Image.fromarray(arr),
        "gray.jpg": Image.fromarray(arr[..., 0]),
        "cmyk.jpg": Image.fromarray(arr).convert("CMYK"),
        "rgb.png": Image.fromarray(noisy),
        "grey.png": Image.fromarray(noisy[..., 0]),
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "palette.png": Image.fromarray(noisy).convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "grey-transparent.png": grey_with_transparency,
        "deep.png": Image.fromarray((noisy[..., 0].astype(np.uint16) * 257 + 3)),
    }
    for name, img in cases.items():
        options = {"quality": 95} if name.endswith(".jpg") else {}
        if "transparency" in img.info:
            options["transparency"] = img.info["transparency"]
        path = save(img, tmp_path / name, **options)
        tensor = read_pixels(path, min_size=256).numpy().transpose(1, 2, 0).astype(int)
        pil = np.asarray(open_image(path, min_size=256), dtype=int)
        assert tensor.shape == pil.shape, name
        tolerance = 2 if name.endswith(".jpg") else 0  # two libjpeg-turbo builds may round differently
        assert np.abs(tensor - pil).max() <= tolerance, name


def test_png_exif_orientation_is_applied_on_every_path(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.png"
    Image.fromarray(gradient(40, 30)).save(path, exif=exif.tobytes())
    assert tuple(read_pixels(path).shape) == (3, 40, 30) and open_image(path).size == (30, 40)


def test_png_exif_after_the_pixel_data_is_applied_too(tmp_path):
    """PNG allows the eXIf chunk after the image data; the fast path must look there too."""
    import struct
    import zlib

    exif = Image.Exif()
    exif[0x0112] = 6
    data = io.BytesIO()
    Image.fromarray(gradient(40, 30)).save(data, format="PNG")
    payload = exif.tobytes()[6:]  # without the "Exif\0\0" header, as PNG stores it
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    png = data.getvalue()
    end = png.rindex(b"IEND") - 4  # before IEND's length field
    path = tmp_path / "late.png"
    path.write_bytes(png[:end] + chunk + png[end:])
    assert png.index(b"IDAT") < path.read_bytes().index(b"eXIf")
    assert open_image(path).size == (30, 40)  # Pillow finds it after the pixels
    assert tuple(read_pixels(path).shape) == (3, 40, 30)
    assert tuple(decode_pixels(path.read_bytes()).shape) == (3, 40, 30)


def test_read_pixels_applies_exif_orientation_on_the_fast_path(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(gradient(40, 30)).save(path, exif=exif.tobytes())
    assert tuple(read_pixels(path).shape) == (3, 40, 30)


def test_model_input_resize_is_pillows_within_one_level():
    """Preprocessing resizes uint8 natively; on the real photos (down- and upscaled) it agrees
    with Pillow's antialiased resize, as the ImageNet weights were trained with, to within
    one grey level, and exactly on nearly every pixel."""
    import torch
    from helpers import photo_paths
    from torchvision.transforms import functional as TF

    from featscope.pipelines.core.models import Preprocessing

    prep = Preprocessing()
    for src, side in [(p, s) for p in photo_paths() for s in (120, 500)]:
        img = Image.open(src).convert("RGB")
        img.thumbnail((side, side))
        ours = prep.to_uint8(TF.pil_to_tensor(img)).permute(1, 2, 0).numpy().astype(int)
        pillow = np.asarray(TF.center_crop(TF.resize(img, [prep.resize], antialias=True), [prep.crop])).astype(int)
        assert ours.shape == pillow.shape == (prep.crop, prep.crop, 3)
        assert np.abs(ours - pillow).max() <= 1 and (ours != pillow).mean() < 0.01, src.name
    assert torch.equal(prep.to_uint8(torch.full((3, 300, 400), 7, dtype=torch.uint8)),
                       torch.full((3, 224, 224), 7, dtype=torch.uint8))
