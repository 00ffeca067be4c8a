"""The README's table from the model card's `vllm serve` flags to our config names real fields, with the
defaults it states for configs/gpu-fp8.yaml."""
from __future__ import annotations

import re

from pipeline.config import PipelineConfig
from tests.conftest import ROOT


def _table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### From the model card's `vllm serve`", 1)[1].split("\n### ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `--") or line.startswith("| the model")]


def test_every_mapped_field_exists_and_the_stated_defaults_hold():
    config = PipelineConfig.load(ROOT / "configs" / "gpu-fp8.yaml", environ={})
    rows = _table()
    assert len(rows) == 8
    for flag, here, _ in rows:
        for name in re.findall(r"`([a-z_]+\.[a-z_]+)`", here):
            section, field = name.split(".")
            assert hasattr(getattr(config, section), field), f"{flag}: {name} is not a config field"
    assert config.engine.tensor_parallel_size == 1 and config.engine.gpu_memory_utilization == 0.9
    assert config.engine.max_model_len == 8192 and config.engine.enforce_eager is False
    assert config.model.served_name == "gemma-3-12b-it" and config.model.source == "RedHatAI/gemma-3-12b-it-FP8-dynamic"
    assert (config.serve.host, config.serve.port) == ("0.0.0.0", 8000)
