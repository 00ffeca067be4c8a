"""The one place where the pipeline changes vLLM's behaviour instead of configuring it: each request's
image range is computed once, not on every engine step.

For prefix-LM models such as Gemma 3, whose image tokens attend to each other in both directions, vLLM
(0.26 to 0.29) rebuilds every running request's image range on every step. The V2 model runner does it
in `compute_mm_prefix_ranges`, the V1 runner in `_prepare_inputs`. Both call
`PlaceholderRange.extract_embeds_range()`, which runs about ten small torch CPU operations over the
placeholder's `is_embed` mask. A request's range never changes, and the steps of its decode have no image
work at all. At ~250 decoding requests that is ~12 ms of host time per step on the dev machine
(`python -m bench.mm_range_cost`). In comparison, a text-only step leaves ~3.5 ms of host time in all
(docs/performance.md, "Where the time goes with images").

The patch keeps the result on the PlaceholderRange itself, which is frozen, and whose mask is never
written after the request is built. Results are unchanged: tests/unit/engine/test_vllm_patches.py compares
the patched and original functions. PIPELINE_VLLM_RANGE_CACHE=0 leaves vLLM as it is; it is the
benchmark's `no-range-cache` knob.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Mapping

logger = logging.getLogger(__name__)

ENV_SWITCH = "PIPELINE_VLLM_RANGE_CACHE"
_CACHED = "_pipeline_embeds_ranges"


def range_cache_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the patch applies under this environment: on unless PIPELINE_VLLM_RANGE_CACHE=0."""
    return environ.get(ENV_SWITCH, "1") != "0"


def cache_embeds_ranges() -> bool:
    """Memoise `PlaceholderRange.extract_embeds_range` per instance (idempotent); False when switched off."""
    if not range_cache_enabled():
        return False
    from vllm.multimodal.inputs import PlaceholderRange

    original = PlaceholderRange.extract_embeds_range
    if getattr(original, "_pipeline_cached", False):
        return True

    @functools.wraps(original)
    def extract_embeds_range(self) -> list[tuple[int, int]]:
        if self.is_embed is None:  # no mask: vLLM's own path is a single tuple, nothing to save
            return original(self)
        ranges = self.__dict__.get(_CACHED)
        if ranges is None:
            ranges = original(self)
            object.__setattr__(self, _CACHED, ranges)  # frozen dataclass: fields stay as they are
        return list(ranges)  # each caller gets its own list, as from the original

    extract_embeds_range._pipeline_cached = True
    extract_embeds_range._pipeline_original = original
    PlaceholderRange.extract_embeds_range = extract_embeds_range
    logger.debug("vLLM PlaceholderRange.extract_embeds_range memoised per request (%s)", __name__)
    return True
