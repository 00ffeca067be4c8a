"""A sample dataset of image + prompt records: real photos where an installed package ships some, plus
generated images in the formats and modes real datasets hold (JPEG with EXIF rotation, PNG with
alpha, grayscale, palette GIF, WebP, 16-bit PNG).

    python -m pipeline.testing.sample_data OUT_DIR [--rows 24]

writes OUT_DIR/records.parquet (images as bytes) and OUT_DIR/images/ (the same images as files, for
records that name them by path).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Real photographs shipped inside scikit-image's wheel (read as files; skimage itself is not imported).
SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "camera.png", "retina.jpg", "coins.png", "moon.png", "brick.png",
                  "grass.png"]
PROMPTS = ["Describe this image in one sentence.", "What is the main subject of this picture?",
           "List the colors you see.", "Write a short caption for this photo.", None]


@dataclass
class SampleImage:
    name: str
    data: bytes
    kind: str  # "photo" or "generated"


def real_photos() -> Iterator[SampleImage]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        logger.warning("scikit-image is not installed: the sample has generated images only")
        return
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    for name in SKIMAGE_PHOTOS:
        path = folder / name
        if path.is_file():
            yield SampleImage(f"photo-{path.stem}{path.suffix}", path.read_bytes(), "photo")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def generated_images(count: int, seed: int = 0) -> Iterator[SampleImage]:
    """Synthetic scenes, cycling through formats and modes that need conversion."""
    rng = random.Random(seed)
    for index in range(count):
        width, height = rng.choice([(640, 480), (1024, 768), (480, 640), (1200, 300), (300, 300)])
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        base = np.broadcast_to(gradient, (height, width, 3)) * np.array(
            [rng.random(), rng.random(), rng.random()], dtype=np.float32)
        image = Image.fromarray(base.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(2, 6)):
            x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
            box = (x0, y0, x0 + rng.randint(20, width // 2), y0 + rng.randint(20, height // 2))
            color = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        variant = index % 6
        if variant == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
            yield SampleImage(f"gen-{index:03d}-exif.jpg", _encode(image, "JPEG", quality=90, exif=exif), "generated")
        elif variant == 1:
            rgba = image.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(image.size))
            yield SampleImage(f"gen-{index:03d}-alpha.png", _encode(rgba, "PNG"), "generated")
        elif variant == 2:
            yield SampleImage(f"gen-{index:03d}-gray.png", _encode(image.convert("L"), "PNG"), "generated")
        elif variant == 3:
            yield SampleImage(f"gen-{index:03d}-palette.gif", _encode(image.convert("P"), "GIF"), "generated")
        elif variant == 4:
            yield SampleImage(f"gen-{index:03d}.webp", _encode(image, "WEBP", quality=85), "generated")
        else:
            gray16 = (np.asarray(image.convert("L"), dtype=np.uint16) * 257)
            yield SampleImage(f"gen-{index:03d}-16bit.png", _encode(Image.fromarray(gray16), "PNG"), "generated")


def sample_images(count: int, seed: int = 0) -> list[SampleImage]:
    photos = list(real_photos())[:count]
    return photos + list(generated_images(count - len(photos), seed))


def write_sample_dataset(out_dir: str | Path, rows: int = 24, seed: int = 0) -> Path:
    """Write records.parquet: the first half carries image bytes, the second half local paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for index, sample in enumerate(sample_images(rows, seed)):
        path = out / "images" / sample.name
        path.write_bytes(sample.data)
        by_path = index >= rows // 2
        records.append({
            "id": f"sample-{index:04d}",
            "image": None if by_path else sample.data,
            "image_uri": str(path.resolve()) if by_path else None,
            "prompt": rng.choice(PROMPTS),
            "source_name": sample.name,
            "kind": sample.kind,
        })
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_uri", pa.string()),
                        ("prompt", pa.string()), ("source_name", pa.string()), ("kind", pa.string())])
    target = out / "records.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=schema), target)
    logger.info("wrote %d sample records to %s", len(records), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the sample image dataset.")
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    write_sample_dataset(args.out, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
