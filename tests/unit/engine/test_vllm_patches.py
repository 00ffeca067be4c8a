"""Our one vLLM patch (pipeline/engine/patches.py): each request's image ranges computed once, with the
same results as vLLM's own function, installed by the plugin vLLM loads in every process, and off
when switched off."""
import subprocess
import sys

import torch
from vllm.multimodal.inputs import PlaceholderRange

from pipeline.engine.patches import ENV_SWITCH, cache_embeds_ranges


def _masks():
    gemma3 = torch.zeros(262, dtype=torch.bool)
    gemma3[3:259] = True  # "\n\n<start_of_image>" + 256 image tokens + "<end_of_image>\n\n"
    several = torch.tensor([False, True, True, False, True, False, False, True])
    return [gemma3, several, torch.zeros(5, dtype=torch.bool), torch.ones(4, dtype=torch.bool), None]


def test_patched_ranges_equal_vllms_own_and_are_computed_once(monkeypatch):
    assert cache_embeds_ranges() and cache_embeds_ranges()  # idempotent
    patched = PlaceholderRange.extract_embeds_range
    original = patched._pipeline_original
    for mask in _masks():
        placeholder = PlaceholderRange(offset=40, length=262 if mask is None else len(mask), is_embed=mask)
        expected = original(PlaceholderRange(offset=40, length=placeholder.length, is_embed=mask))
        assert placeholder.extract_embeds_range() == expected
        first = placeholder.extract_embeds_range()
        first.append((0, 0))  # a caller changing its list changes no one else's
        assert placeholder.extract_embeds_range() == expected

    # The second call does no torch work: count the nonzero() calls the original makes.
    calls = []
    real_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or real_nonzero(*a, **k))
    placeholder = PlaceholderRange(offset=0, length=8, is_embed=_masks()[1])
    placeholder.extract_embeds_range()
    made = len(calls)
    for _ in range(5):
        placeholder.extract_embeds_range()
    assert made == 2 and len(calls) == made
    # Equality and the dataclass fields are vLLM's: the cache is not a field.
    assert placeholder == PlaceholderRange(offset=0, length=8, is_embed=placeholder.is_embed)


def test_the_plugin_installs_it_and_the_switch_leaves_vllm_alone():
    """In a fresh interpreter, as vLLM's processes start: the plugin's register() leaves vLLM alone while
    switched off, and patches once switched on."""
    probe = f"""
import os
from vllm.multimodal.inputs import PlaceholderRange as P
import pipeline.engine.plugin as plugin
os.environ["{ENV_SWITCH}"] = "0"
plugin.register()
off = getattr(P.extract_embeds_range, "_pipeline_cached", False)
del os.environ["{ENV_SWITCH}"]
plugin.register()
print(off, getattr(P.extract_embeds_range, "_pipeline_cached", False))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["False", "True"]
