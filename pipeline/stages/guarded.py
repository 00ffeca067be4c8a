"""The engine stage UDFs with crash isolation (pipeline.stages.crash_isolation), and the override that installs them.

A module of its own because subclassing Ray's engine UDF imports Ray's LLM stack and vLLM: batch.py imports
it only while building the processor, so `import pipeline` stays light.
"""
from __future__ import annotations

from typing import Callable, Optional

from ray.llm._internal.batch.stages.base import StatefulStage
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage, vLLMEngineStageUDF

from pipeline.stages.crash_isolation import CrashIsolatingEngine, EngineGuardSettings
from pipeline.stages.patch import replace_stage_udf
from pipeline.stages.tools import ToolChainEngineUDF


class CrashIsolatingEngineUDF(CrashIsolatingEngine, vLLMEngineStageUDF):
    """Ray's vLLM engine stage with crash isolation."""


class CrashIsolatingToolChainEngineUDF(CrashIsolatingEngine, ToolChainEngineUDF):
    """Our tool-chain engine stage with crash isolation (a record's whole chain runs under one attempt)."""


_GUARDED = {vLLMEngineStageUDF: CrashIsolatingEngineUDF, ToolChainEngineUDF: CrashIsolatingToolChainEngineUDF}


def engine_stage_overrides(guard: EngineGuardSettings, then: Optional[Callable[[str, StatefulStage], None]] = None
                           ) -> Callable[[str, StatefulStage], None]:
    """An `override_stage_config_fn` for Ray's ProcessorBuilder: `then` first (the tool UDFs), then the
    engine stage's UDF class is swapped for its crash-isolating variant."""

    def override(name: str, stage: StatefulStage) -> None:
        if then is not None:
            then(name, stage)
        if isinstance(stage, vLLMEngineStage):
            guarded = _GUARDED.get(stage.fn)
            if guarded is None:
                raise TypeError(f"no crash-isolating variant of the engine UDF {stage.fn.__name__}")
            replace_stage_udf(stage, guarded, ledger_name=guard.ledger_name,
                              max_engine_attempts=guard.max_engine_attempts)

    return override
