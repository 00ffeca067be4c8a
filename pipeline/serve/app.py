"""The online endpoint: Gemma 3 behind an OpenAI-compatible Ray Serve application (`ray.serve.llm`).

    build_app(config)  -> Application   lazy; deploy it with serve.run
    app_builder(args)  -> Application   import path for `serve run` / `serve deploy` config files
    run_serve(config)                   start Serve on the configured Ray and deploy (blocking or not)

Three deployments, two from Ray: the engine (`LLMServer`, one vLLM engine per replica, which warms up
before it takes traffic: `warmup.WarmLLMServer`) built by
`LLMConfig` from the same config as batch (`engine.serving_engine_kwargs`, `engine.placement_group`),
and the HTTP ingress (`ingress.GuardedIngress`, Ray's OpenAI ingress behind our guard); and one
of ours, the per-key rate limiter (`limits.RateLimiter`, one replica that every ingress replica asks).

Scaling and overload: engine replicas autoscale between serve.min_replicas and serve.max_replicas
aiming at serve.target_ongoing_requests each (Ray's default target of 1e9 never scales up);
each replica takes at most serve.max_ongoing_requests and serve.max_queued_requests more wait, beyond
which Ray Serve raises a back-pressure error that the client sees at once as a 503. The ingress
replicas autoscale on their own (they check keys and decode images on CPU).
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from pipeline.engine.checkpoint import check_checkpoint, check_loadable, inspect_checkpoint, read_checkpoint_file
from pipeline.config import ConfigError, PipelineConfig, read_api_keys
from pipeline.engine.args import placement_group, runtime_env, serving_engine_kwargs, workers_per_replica
from pipeline.ops.runtime import init_ray
from pipeline.serve import in_process
from pipeline.io.storage import is_s3

if TYPE_CHECKING:
    from ray.serve.deployment import Application

    from pipeline.io.images import ImageTarget

logger = logging.getLogger(__name__)


def llm_config_args(config: PipelineConfig) -> dict[str, Any]:
    """The arguments of the engine deployment's `ray.serve.llm.LLMConfig` (plain data, for tests)."""
    serve, source = config.serve, config.model.source
    args: dict[str, Any] = {
        "model_loading_config": {
            "model_id": config.model.served_name,
            # Ray mirrors an s3:// checkpoint to local disk itself (CloudMirrorConfig).
            "model_source": {"bucket_uri": source} if is_s3(source) else source,
        },
        "engine_kwargs": serving_engine_kwargs(config),
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": serve.min_replicas,
                "initial_replicas": max(serve.min_replicas, 1),
                "max_replicas": serve.max_replicas,
                "target_ongoing_requests": serve.target_ongoing_requests,
            },
            "max_ongoing_requests": serve.max_ongoing_requests,
            "max_queued_requests": serve.max_queued_requests,
        },
        "accelerator_type": config.engine.accelerator_type,
        "placement_group_config": placement_group(config),
        "runtime_env": runtime_env(config),
    }
    # Ray's LLMServer with our plugins loaded first, plus warm-up requests at the end of its start unless
    # turned off (LLMConfig.server_cls).
    args["server_cls"] = ("pipeline.serve.warmup:WarmLLMServer" if serve.warmup
                          else "pipeline.serve.warmup:PluginLLMServer")
    if config.engine.device == "cpu":
        # Without it Ray's LLM server looks for a GPU.
        args["accelerator_config"] = {"kind": "cpu"}
    elif config.engine.gpu_share < 1 and not serve.in_process_engine:
        raise ConfigError(f"engine.gpu_share ({config.engine.gpu_share}) below 1 needs serve.in_process_engine "
                          "online: vLLM's Ray executor asks Ray for a whole GPU per worker, which a shared "
                          "GPU's bundle cannot hold, and the replica never starts")
    elif serve.in_process_engine and workers_per_replica(config) == 1:
        # One-GPU replicas run the model in vLLM's engine core, not a Ray worker (serve/in_process.py).
        args["experimental_configs"] = {in_process.EXECUTOR_KEY: in_process.IN_PROCESS}
    return args


def llm_config(config: PipelineConfig):
    """The `ray.serve.llm.LLMConfig` of the engine deployment."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(**llm_config_args(config))


def ingress_deployment_config(config: PipelineConfig) -> dict[str, Any]:
    serve = config.serve
    return {"autoscaling_config": {"min_replicas": serve.ingress_min_replicas,
                                   "max_replicas": serve.ingress_max_replicas,
                                   "target_ongoing_requests": serve.ingress_target_ongoing_requests},
            "ray_actor_options": {"num_cpus": serve.ingress_num_cpus}}


def build_app(config: PipelineConfig) -> "Application":
    """The Serve application (lazy). Checks the checkpoint's scheme first, as batch does."""
    from ray.serve.llm import build_openai_app

    from pipeline.serve.ingress import GuardedIngress
    from pipeline.serve.limits import limiter_app

    config = config.with_absolute_paths()
    scheme = check_servable(config)
    logger.info("serving %s (%s) as %s: engine replicas %d..%d (target %s ongoing), queue %d",
                config.model.source, scheme, config.model.served_name, config.serve.min_replicas,
                config.serve.max_replicas, config.serve.target_ongoing_requests, config.serve.max_queued_requests)
    target = serving_image_target(config)
    return build_openai_app({
        "llm_configs": [llm_config(config)],
        "ingress_cls_config": {"ingress_cls": GuardedIngress,
                               "ingress_extra_kwargs": {"pipeline_config": config.model_dump(mode="json"),
                                                        # Bound here, a handle in the ingress: one
                                                        # limiter for every ingress replica.
                                                        "rate_limiter": limiter_app(config),
                                                        "image_target": {"size_px": target.size_px,
                                                                         "resample": int(target.resample)}}},
        "ingress_deployment_config": ingress_deployment_config(config),
    })


def serving_image_target(config: PipelineConfig) -> "ImageTarget":
    """The size and filter the ingress resizes images to: the checkpoint's image processor's, as batch
    reads them, so the engine's own resize is a no-op."""
    from pipeline.io.images import image_target

    preprocessor = read_checkpoint_file(config.model.source, "preprocessor_config.json", config.storage)
    return image_target(json.loads(preprocessor) if preprocessor else None, config.images.target_size_px)


def check_servable(config: PipelineConfig) -> str:
    """The checkpoint's quantization scheme, after checking it is the configured one (as batch does)."""
    info = inspect_checkpoint(config.model.source, config.storage)
    check_checkpoint(info, config.model.quantization)
    check_loadable(info, config.storage, maps_transformers_siglip=config.engine.normalize_images_on_device)
    return info.scheme


def app_builder(args: dict[str, Any]) -> "Application":
    """`import_path: pipeline.serve:app_builder` with `args: {config: FILE, set: [section.field=value]}`."""
    unknown = set(args) - {"config", "set"}
    if unknown:
        raise ConfigError(f"app_builder args: unknown {sorted(unknown)}; allowed: config, set")
    return build_app(PipelineConfig.load(args.get("config"), list(args.get("set") or [])))


def run_serve(config: PipelineConfig, *, blocking: bool = True,
              on_ray_ready: Optional[Callable[[], None]] = None) -> None:
    """Start Serve's HTTP proxy on serve.host:serve.port and deploy the app.

    Blocking runs until interrupted (then the caller shuts Serve down). On an embedded Ray the API
    keys must be visible here, or it fails before any engine starts. `on_ray_ready` runs right after
    Ray is up, before the app deploys (where a caller installs signal handlers that Ray's would replace).
    """
    config = config.with_absolute_paths()
    _check_keys_visible(config)
    check_servable(config)  # before Ray starts: a wrong checkpoint fails fast
    init_ray(config)
    if on_ray_ready is not None:
        on_ray_ready()
    from ray import serve

    serve.start(http_options={"host": config.serve.host, "port": config.serve.port},
                proxy_location=config.serve.proxy_location)
    serve.run(build_app(config), name=config.serve.app_name, route_prefix="/", blocking=False)
    logger.info("serving %s at http://%s:%d/v1", config.model.served_name, config.serve.host, config.serve.port)
    while blocking:
        time.sleep(3600)


def _check_keys_visible(config: PipelineConfig) -> Optional[int]:
    try:
        return len(read_api_keys(config.serve))
    except ConfigError:
        if config.runtime.ray_address:
            # On a cluster the ingress replicas may see a secret this driver does not.
            logger.warning("no API key visible to this driver; ingress replicas must find $%s or %s",
                           config.serve.api_keys_env, config.serve.api_keys_file)
            return None
        raise
