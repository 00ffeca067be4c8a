"""Joining Ray: the cluster address, a local Ray's size, environment variables.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

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
    kernel_cache_dir: Optional[str] = Field(
        default=None,
        description="A directory on every engine node that outlives the engine (a node disk kept across "
        "pod restarts, or storage the nodes share) for vLLM's torch.compile and start-up caches and "
        "Triton's and Inductor's kernel caches (VLLM_CACHE_ROOT, TRITON_CACHE_DIR and "
        "TORCHINDUCTOR_CACHE_DIR point under it). A restarted or added replica then reuses the compiled "
        "graphs and kernels instead of building them again: torch.compile alone took ~80 s of a cold "
        "replica start on an H200, ~10 s warm (docs/performance.md). An absolute path. None keeps each "
        "library's default under the home directory, which a new container starts without.",
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

    @field_validator("kernel_cache_dir")
    @classmethod
    def _absolute_local_dir(cls, value: Optional[str]) -> Optional[str]:
        # Every engine process on every node reads it: a relative path would differ per working directory.
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be an absolute local path (every node's engines use it), got {value!r}")
        return value

    def process_env_vars(self) -> dict[str, str]:
        """The environment of Ray workers and engine processes: env_vars, plus the kernel cache
        variables when kernel_cache_dir is set (a name also set in env_vars keeps that value)."""
        cache: dict[str, str] = {}
        if self.kernel_cache_dir:
            root = self.kernel_cache_dir.rstrip("/")
            cache = {name: f"{root}/{sub}" for name, sub in KERNEL_CACHE_VARIABLES.items()}
        return {**cache, **self.env_vars}


# Where each library keeps what it compiles, under runtime.kernel_cache_dir: vLLM's torch.compile
# artefacts and start-up plans (VLLM_CACHE_ROOT/torch_compile_cache, .../startup_plan), Triton's JIT
# kernels (its attention among them), Inductor's generated code.
KERNEL_CACHE_VARIABLES = {"VLLM_CACHE_ROOT": "vllm", "TRITON_CACHE_DIR": "triton",
                          "TORCHINDUCTOR_CACHE_DIR": "inductor"}
