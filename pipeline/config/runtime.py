"""Joining Ray: the cluster address, a local Ray's size, environment variables.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from pipeline.config.base import _Section


class RuntimeSection(_Section):
    ray_address: Optional[str] = Field(
        default=None,
        description="Ray cluster to join. None joins $RAY_ADDRESS when set (as under `ray job submit`), "
        "else starts an embedded local Ray.",
    )
    local_num_cpus: Optional[int] = Field(
        default=None, ge=1,
        description="Logical CPUs of the embedded local Ray. Small machines need more logical CPUs than "
        "cores, since every stage's actor reserves one.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for Ray workers and engine processes (e.g. HF_HUB_OFFLINE).",
    )
    metrics_export_port: Optional[int] = Field(
        default=None, ge=1, le=65535,
        description="Port of Ray's Prometheus endpoint (each node's metrics agent serves /metrics there) "
        "when the job starts its embedded local Ray. None lets Ray pick a free port. On a cluster the "
        "port is `ray start --metrics-export-port`, and this field is ignored.",
    )
    engine_metrics: bool = Field(
        default=True,
        description="Export vLLM's engine metrics (queue, KV-cache use, prefix-cache hits, time to first "
        "token...) through Ray's Prometheus endpoint, next to the pipeline's own counters (ray.data.llm "
        "log_engine_metrics). Costs a little CPU per engine step.",
    )
