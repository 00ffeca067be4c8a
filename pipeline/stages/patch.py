"""Install our UDF class on one of Ray's batch LLM stages (`ray.data.llm` processor stages).

The one place that patches a stage, shared by every `override_stage_config_fn` we pass to Ray's
ProcessorBuilder (rendered prompts, tool chains, OpenAI Batch templates, crash isolation).

The vLLMEngineStage validator re-runs on attribute assignment and then asks for a GPU even with our
CPU placement bundles (assigning `stage.fn` turned `{'num_cpus': 1}` into `{'num_cpus': 1, 'num_gpus':
1}`), so the class is set without validation.
"""
from __future__ import annotations

from typing import Any

from ray.llm._internal.batch.stages.base import StatefulStage


def replace_stage_udf(stage: StatefulStage, udf: type, **constructor_kwargs: Any) -> None:
    object.__setattr__(stage, "fn", udf)  # without re-validation, see the module docstring
    stage.fn_constructor_kwargs.update(constructor_kwargs)
