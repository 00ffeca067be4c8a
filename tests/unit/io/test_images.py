import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ImageSection
from pipeline.io.images import ImageTarget, image_target, prepare_image
from pipeline.io.records import ErrorKind, RecordError
from pipeline.testing.sample_data import sample_images

TARGET = ImageTarget(size_px=896)
LIMITS = ImageSection()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_every_sample_image_becomes_a_square_rgb_image():
    samples = sample_images(24)
    assert sum(s.kind == "photo" for s in samples) >= 10, "scikit-image's photos are missing"
    for sample in samples:
        image = prepare_image(sample.data, LIMITS, TARGET)
        assert image.mode == "RGB" and image.size == (896, 896), sample.name


def test_exif_orientation_is_applied():
    # A wide image, red on the left half; EXIF orientation 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    out = np.asarray(prepare_image(data, LIMITS, ImageTarget(size_px=64)))
    # After rotating clockwise, the red half is at the top.
    assert out[:16, :, 0].mean() > 200 and out[-16:, :, 0].mean() < 50


def test_transparency_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    out = np.asarray(prepare_image(encode(rgba, "PNG"), LIMITS, ImageTarget(size_px=32)))
    assert out.min() == 255


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    gray16 = Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16))
    out = np.asarray(prepare_image(encode(gray16, "PNG"), LIMITS, ImageTarget(size_px=32)))
    assert 120 <= out.mean() <= 135


def test_target_comes_from_the_processor_config():
    assert image_target({"size": {"height": 448, "width": 448}, "resample": 3}) == ImageTarget(448, 3)
    assert image_target(None) == ImageTarget(896, 2)
    assert image_target({"size": {"height": 896, "width": 896}}, override_px=224).size_px == 224
    with pytest.raises(ValueError):
        image_target({"size": {"height": 448, "width": 896}})


def _jpeg() -> bytes:
    return encode(Image.new("RGB", (300, 200), (10, 120, 200)), "JPEG")


@pytest.mark.parametrize("data, limits, kind", [
    pytest.param(b"", LIMITS, ErrorKind.EMPTY_IMAGE, id="empty"),
    pytest.param(b"definitely not an image" * 20, LIMITS, ErrorKind.NOT_AN_IMAGE, id="text-bytes"),
    pytest.param(_jpeg()[: len(_jpeg()) // 2], LIMITS, ErrorKind.CORRUPT_IMAGE, id="truncated-jpeg"),
    pytest.param(_jpeg(), ImageSection(max_bytes=100), ErrorKind.IMAGE_TOO_LARGE, id="over-byte-limit"),
    pytest.param(_jpeg(), ImageSection(max_pixels=300 * 199), ErrorKind.TOO_MANY_PIXELS, id="over-pixel-limit"),
    pytest.param(_jpeg(), ImageSection(allowed_formats=["png"]), ErrorKind.UNSUPPORTED_FORMAT, id="format-not-allowed"),
])
def test_bad_bytes_raise_a_record_error_of_the_right_kind(data, limits, kind):
    with pytest.raises(RecordError) as info:
        prepare_image(data, limits, TARGET)
    assert info.value.kind == kind
    assert info.value.stage.value == "image"


@pytest.mark.parametrize("side_px", [
    pytest.param(12000, id="our-limit"),           # 144 MP: over max_pixels, under Pillow's own guard
    pytest.param(20000, id="pillow-bomb-guard"),   # 400 MP: Pillow refuses it while opening
])
def test_pixel_limit_is_checked_before_decoding(side_px):
    # A one-colour PNG: tiny on disk, hundreds of MB decoded. The refusal must come from the header.
    huge = Image.new("L", (side_px, side_px), 0)
    data = encode(huge, "PNG", optimize=False)
    del huge
    with pytest.raises(RecordError) as info:
        prepare_image(data, ImageSection(max_pixels=50_000_000), TARGET)
    assert info.value.kind == ErrorKind.TOO_MANY_PIXELS
    assert str(side_px * side_px) in info.value.message
