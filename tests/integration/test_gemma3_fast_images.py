"""Our Gemma 3 variant must feed the vision tower the same numbers as the stock HF processor path."""
import pytest
import torch
from transformers import AutoProcessor

from pipeline.config import ImageSection
from pipeline.io.images import image_target, prepare_image
from pipeline.testing.sample_data import sample_images
from pipeline.engine.gemma3 import Uint8ImageProcessor, normalise_uint8_pixels, pixel_normalisation

pytestmark = pytest.mark.integration


def test_uint8_pixels_normalised_on_device_equal_the_hf_processor(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    target = image_target({"size": {"height": 896, "width": 896}})
    # Images as our CPU stage prepares them (already at the model's size), from every sample format.
    images = [prepare_image(s.data, ImageSection(), target) for s in sample_images(12)]
    stock = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    fast = Uint8ImageProcessor(processor.image_processor)(images)
    assert fast["pixel_values"].dtype == torch.uint8 and fast["pixel_values"].shape == (12, 3, 896, 896)
    assert fast["num_crops"] == [0] * 12
    scale, offset = pixel_normalisation(str(tiny_model))
    ours = normalise_uint8_pixels(fast["pixel_values"], scale, offset, torch.float32)
    assert stock.dtype == torch.float32 and stock.shape == ours.shape
    assert torch.max(torch.abs(ours - stock)).item() < 1e-6
    # The variant delegates everything but the call to the stock processor (vLLM reads these).
    assert Uint8ImageProcessor(processor.image_processor).do_pan_and_scan == processor.image_processor.do_pan_and_scan


def test_images_of_other_sizes_are_resized_to_the_model_size(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    from PIL import Image

    out = Uint8ImageProcessor(processor.image_processor)([Image.new("L", (640, 300), 7)])
    assert out["pixel_values"].shape == (1, 3, 896, 896) and int(out["pixel_values"].max()) == 7
