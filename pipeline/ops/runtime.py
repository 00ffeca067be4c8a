"""Joining Ray: the process-wide state a job needs, set in one place and logged."""
from __future__ import annotations

import logging

from pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)


def init_ray(config: PipelineConfig) -> None:
    """Join the configured cluster, or start an embedded local Ray when none is configured."""
    import ray

    if ray.is_initialized():
        return
    runtime = config.runtime
    env_vars = runtime.process_env_vars()
    env = {"env_vars": env_vars} if env_vars else None
    if runtime.ray_address:
        logger.info("joining Ray cluster at %s", runtime.ray_address)
        ray.init(address=runtime.ray_address, runtime_env=env, log_to_driver=True)
    else:
        logger.info("starting embedded local Ray (num_cpus=%s, Prometheus metrics on port %s)",
                    runtime.local_num_cpus or "auto", runtime.metrics_export_port or "chosen by Ray")
        # "local" always starts a new instance: with no address, ray.init() would join whatever cluster
        # `ray start` last left on this machine (/tmp/ray/ray_current_cluster), someone else's included.
        # The metrics agent runs without the dashboard; it serves ray.util.metrics and vLLM's engine
        # metrics on this port (pipeline/batch/metrics.py).
        ray.init(address="local", num_cpus=runtime.local_num_cpus, include_dashboard=False, runtime_env=env,
                 _metrics_export_port=runtime.metrics_export_port)
