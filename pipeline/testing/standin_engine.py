"""A STAND-IN for the engine, for the data-plane scale bench only: no model, no vLLM, a fixed answer.

`bench/scale.py` runs the real caption job (input scan, preparation, resume, write, manifest, report) on
millions of rows on CPUs. Only `ray.data.llm`'s processor (chat template, tokenizer, vLLM, detokenizer)
is replaced: each row still goes through the job's own `RequestBuilder` (preprocess) and `OutputBuilder`
(postprocess), and in between this stand-in answers with a fixed text at a set rate per replica, as an
engine of that speed would. What it measures is everything around the engine; nothing about the model.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from pipeline.config import PipelineConfig
from pipeline.stages.engine_rows import INFERENCE_ERROR

STANDIN_TEXT = "stand-in engine: a fixed caption"
STANDIN_TOKENS = [7, 7, 7, 1]   # ends on the tiny model's stop token: finish_reason "stop"


class StandInEngine:
    """Ray Data callable class (one per replica): preprocess -> a fixed answer -> postprocess, per row.

    Rows that preprocessing marked as errors pass through untouched, as Ray's stages pass them."""

    def __init__(self, preprocess: Callable, postprocess: Callable, rows_per_s: float):
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.interval_s = 1.0 / rows_per_s if rows_per_s > 0 else 0.0
        self.next_at = time.monotonic()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        data = dict(row)
        data.update(self.preprocess(row))
        if data.get(INFERENCE_ERROR):
            data.pop("messages", None)
            return data
        if self.interval_s:   # a paced engine: one row every interval, however fast the rows arrive
            self.next_at = max(self.next_at + self.interval_s, time.monotonic())
            delay = self.next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        data.update({"generated_text": STANDIN_TEXT, "generated_tokens": STANDIN_TOKENS,
                     "num_input_tokens": 300, "num_generated_tokens": len(STANDIN_TOKENS), "time_taken_llm": 0.0})
        return self.postprocess(data)


def standin_processor(rows_per_s: float, replicas: int):
    """An `engine_processor` for pipeline.batch.caption: `replicas` stand-ins, each at `rows_per_s` (0: unpaced)."""

    def factory(config: PipelineConfig, preprocess, postprocess, stage_overrides):
        import ray

        def apply(dataset):
            return dataset.map(StandInEngine, fn_constructor_kwargs={"preprocess": preprocess,
                                                                    "postprocess": postprocess,
                                                                    "rows_per_s": rows_per_s},
                               num_cpus=1, compute=ray.data.ActorPoolStrategy(size=replicas))
        return apply

    return factory
