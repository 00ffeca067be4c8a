"""The pipeline's own counters, exported through Ray's Prometheus endpoint.

Ray serves every process's `ray.util.metrics` on each node's metrics agent (`/metrics` on the port of
`ray start --metrics-export-port`, or `runtime.metrics_export_port` for an embedded Ray), prefixed
`ray_`; counters get Prometheus' `_total` suffix. vLLM's engine metrics (`ray_vllm:...`) come through the
same endpoint when `runtime.engine_metrics` is on, so one scrape config sees both:

    ray_pipeline_rows_total{outcome="ok"|"error"}
    ray_pipeline_errors_total{kind, stage}
    ray_pipeline_prompt_tokens_total, ray_pipeline_completion_tokens_total
    ray_pipeline_engine_latency_seconds (histogram of `engine_latency_s`)

All carry a `model` tag (model.served_name). Values are recorded where rows are finalised (one call per
batch, see pipeline/batch/progress.py), so they count what reaches the writer.
"""
from __future__ import annotations

from typing import Any, Optional

# Seconds; from a warm engine's sub-second answers to a cold replica's minutes.
LATENCY_BOUNDARIES_S = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]


class PipelineMetrics:
    """Ray metrics of the pipeline, created on first use in the process that records them.

    Ray metric objects belong to the process that made them, so they are built lazily inside the
    worker and never pickled with the callable that carries this object to the workers.
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._metrics: Optional[dict[str, Any]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "_metrics": None}

    def _ensure(self) -> dict[str, Any]:
        if self._metrics is None:
            from ray.util.metrics import Counter, Histogram

            self._metrics = {
                "rows": Counter("pipeline_rows", "Output rows finalised, by outcome.", ("model", "outcome")),
                "errors": Counter("pipeline_errors", "Error rows by kind and stage.", ("model", "kind", "stage")),
                "prompt_tokens": Counter("pipeline_prompt_tokens", "Prompt tokens of answered rows.", ("model",)),
                "completion_tokens": Counter("pipeline_completion_tokens", "Generated tokens of answered rows.",
                                             ("model",)),
                "latency": Histogram("pipeline_engine_latency_seconds",
                                     "Seconds from submission to Ray's engine stage to the last token.",
                                     LATENCY_BOUNDARIES_S, ("model",)),
            }
        return self._metrics

    def record(self, tally: dict[str, Any], latencies_s: list[float]) -> None:
        """Add one batch's tally (pipeline.batch.progress.tally_batch) and its engine latencies."""
        metrics = self._ensure()
        model = {"model": self.model_name}
        if tally["ok"]:
            metrics["rows"].inc(tally["ok"], tags={**model, "outcome": "ok"})
        if tally["errors"]:
            metrics["rows"].inc(tally["errors"], tags={**model, "outcome": "error"})
        for (kind, stage), count in tally["errors_by_kind_stage"].items():
            metrics["errors"].inc(count, tags={**model, "kind": kind, "stage": stage})
        if tally["prompt_tokens"]:
            metrics["prompt_tokens"].inc(tally["prompt_tokens"], tags=model)
        if tally["completion_tokens"]:
            metrics["completion_tokens"].inc(tally["completion_tokens"], tags=model)
        for seconds in latencies_s:
            metrics["latency"].observe(seconds, tags=model)
