"""Gemma 3 for vLLM with images sent to the GPU as uint8 and normalised there.

Why: with images, vLLM's single front-end process runs the Hugging Face image processor for every
request (rescale, normalise, stack on 896 x 896 float tensors: ~28 ms of its ~36 ms per request on an
H100 host, docs/notes.md: GPU baseline), so a card that could caption ~70 images/s waits on one CPU core at ~20-30. Our CPU
workers already resize images to the model's square size; this variant makes the front-end only stack
those pixels as uint8 (4x fewer bytes to serialise to the engine core, no float work) and folds rescale
+ normalise into one fused multiply-add on the GPU before the vision tower.

vLLM 0.29 has the same idea as `mm_device_do_normalize`, but only for Qwen2-VL, and vLLM 0.26 (the
benchmark machine's) has none. This is registered under its own architecture name by our vLLM plugin
(`pipeline.engine.plugin`) and chosen with `hf_overrides` (see `pipeline.engine.args`): the stock class is not
replaced. Remove when vLLM's `mm_device_do_normalize` covers Gemma 3.

It also loads both SigLIP key layouts (Google's, and transformers 5's `save_pretrained`), see
`pipeline.engine.checkpoint_layout`.

The model's output is the same function of the pixels: uint8 -> float32 -> x * (rescale / std) - mean / std
-> model dtype, the arithmetic the HF processor does, on another device.
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.v1.utils import record_function_or_nullcontext

from pipeline.engine.checkpoint_layout import to_google_name

logger = logging.getLogger(__name__)

# A named range around the image path in torch profiles: bench/profile_breakdown.py attributes the GPU
# kernels launched inside it to the vision tower. vLLM makes it a no-op unless
# VLLM_CUSTOM_SCOPES_FOR_PROFILING is set (the benchmark sets it only for profiled runs).
VISION_SCOPE = "gemma3: vision tower and projector"


class Uint8ImageProcessor:
    """Stands in for the HF Gemma 3 image processor: same interface, pixels kept as uint8 [n, 3, s, s].

    Everything but `__call__` is delegated to the wrapped processor (sizes, pan-and-scan settings that
    vLLM reads). Images not yet at the model's size are resized with the processor's own filter, so the
    endpoint's arbitrary images take the same path. Pan-and-scan (crops) falls back to the wrapped one.
    """

    def __init__(self, inner: Any):
        self._inner = inner
        size = inner.size  # a dict, or transformers 5's SizeDict
        height = getattr(size, "height", None) or size["height"]
        width = getattr(size, "width", None) or size["width"]
        self._side = (int(height), int(width))
        self._resample = getattr(inner, "resample", Image.Resampling.BILINEAR)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        if kwargs.get("do_pan_and_scan", getattr(self._inner, "do_pan_and_scan", False)):
            return self._inner(images, **kwargs)
        flat = list(_flatten(images))
        height, width = self._side
        arrays = [np.asarray(_as_rgb(image, (width, height), self._resample)) for image in flat]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return BatchFeature({"pixel_values": pixels, "num_crops": [0] * len(flat)})


def _flatten(images: Any) -> Iterable[Any]:
    if isinstance(images, (list, tuple)):
        for item in images:
            yield from _flatten(item)
    else:
        yield images


def _as_rgb(image: Any, size: tuple[int, int], resample: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image if image.size == size else image.resize(size, resample=resample)


class Uint8ImageProcessingInfo(Gemma3ProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        processor = super().get_hf_processor(**kwargs)
        if isinstance(processor.image_processor, Uint8ImageProcessor):
            return processor
        # The context caches processors; change a copy, never the shared one.
        processor = copy.copy(processor)
        processor.image_processor = Uint8ImageProcessor(processor.image_processor)
        return processor


def normalise_uint8_pixels(pixels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """uint8 [n, 3, h, w] -> normalised `dtype`, computed in float32 like the HF processor."""
    return torch.addcmul(offset, pixels.to(torch.float32), scale).to(dtype)


def pixel_normalisation(model_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, offset) with normalised = pixel * scale + offset, from the processor config."""
    from transformers.utils import cached_file

    config_file = cached_file(model_path, "preprocessor_config.json")
    config = json.loads(open(config_file).read()) if config_file else {}
    rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
    mean = config.get("image_mean", [0.5] * 3) if config.get("do_normalize", True) else [0.0] * 3
    std = config.get("image_std", [0.5] * 3) if config.get("do_normalize", True) else [1.0] * 3
    scale = torch.tensor([rescale / s for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, 3, 1, 1)
    return scale, offset


@MULTIMODAL_REGISTRY.register_processor(
    Gemma3MultiModalProcessor,
    info=Uint8ImageProcessingInfo,
    dummy_inputs=Gemma3DummyInputsBuilder,
)
class Gemma3FastImagesForConditionalGeneration(Gemma3ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        scale, offset = pixel_normalisation(vllm_config.model_config.model)
        # Not in the checkpoint: non-persistent, so the weight loader never looks for them.
        self.register_buffer("_pixel_scale", scale, persistent=False)
        self.register_buffer("_pixel_offset", offset, persistent=False)

    def _normalise(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8:
            return pixel_values  # already normalised (vLLM's own dummy inputs)
        dtype = next(self.vision_tower.parameters()).dtype
        return normalise_uint8_pixels(pixel_values, self._pixel_scale, self._pixel_offset, dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Checkpoints saved by transformers 5 (fine-tunes) keep SigLIP under `vision_tower.*`, which the
        # stock loader cannot find; moved to Google's `vision_tower.vision_model.*`, both layouts load.
        return super().load_weights((to_google_name(name), tensor) for name, tensor in weights)

    def embed_multimodal(self, **kwargs: object):
        with record_function_or_nullcontext(VISION_SCOPE):
            return super().embed_multimodal(**kwargs)

    def _image_pixels_to_features(self, vision_tower, pixel_values: torch.Tensor) -> torch.Tensor:
        return super()._image_pixels_to_features(vision_tower, self._normalise(pixel_values))

    def prepare_encoder_cudagraph_replay_buffers(self, mm_kwargs: Mapping[str, Any], *args, **kwargs):
        mm_kwargs = dict(mm_kwargs)
        mm_kwargs["pixel_values"] = self._normalise(mm_kwargs["pixel_values"])
        return super().prepare_encoder_cudagraph_replay_buffers(mm_kwargs, *args, **kwargs)
