"""The HTTP ingress of the endpoint: Ray's OpenAI ingress with the request guard in front of it.

How it plugs into `ray.serve.llm` (Ray 2.60): `build_openai_app` takes `ingress_cls_config.ingress_cls`,
a documented field of `LLMServingArgs`, and turns that class into the FastAPI ingress deployment with all
of Ray's OpenAI routes, streaming and model routing (`make_fastapi_ingress`). `GuardedIngress` is that
class: a subclass of Ray's `OpenAiIngress` that changes no route. The guard has to run before FastAPI
reads and parses a body (the key first, then the body size, then the content), so it is ASGI
middleware (`http.GuardMiddleware`). Ray builds the FastAPI app itself and takes no middleware
argument, so the middleware is added in `__serve_build_asgi_app__`, the hook a Serve replica calls
after the constructor and before the app's lifespan starts (`ray/serve/_private/replica.py: _initialize_asgi_callable`; documented under
`serve.ingress` for late-bound apps).

Rejected: an ingress deployment of our own that calls the LLM deployment handles (it would copy Ray's
routing, streaming and error code); overriding each route method (FastAPI has already read and
validated the body by then, so a request without a key would learn about its body first).

Errors: the guard answers 4xx itself (`guard.ApiError`); errors raised further in (FastAPI's
schema validation, Ray, vLLM) are reshaped on the way out by `errors`, so every 4xx/5xx body is
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from ray.exceptions import RayActorError
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from vllm.exceptions import VLLMValidationError

from pipeline.config import FetchSection, PipelineConfig, read_api_keys
from pipeline.io.fetch import Fetcher
from pipeline.io.images import ImageTarget
from pipeline.serve.errors import lost_replica_error, validation_error
from pipeline.serve.guard import ApiError, ApiKeyCheck, RequestPolicy
from pipeline.serve.http import GuardMiddleware
from pipeline.serve.limits import SharedLimiter, TokenBuckets

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0


class GuardedIngress(OpenAiIngress):
    """Ray's OpenAI ingress; every request passes `GuardMiddleware` first."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, pipeline_config: dict[str, Any],
                 rate_limiter=None, image_target: Optional[dict[str, int]] = None, **kwargs):
        """`rate_limiter`: the handle of the shared `limits.RateLimiter` deployment (Serve resolves
        the bound deployment in these kwargs); `image_target`: the checkpoint's image size and filter."""
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        config = PipelineConfig.model_validate(pipeline_config)
        # Read in the replica: keys come from this process's environment or a mounted file and are never
        # part of the config or of Ray's deployment arguments. No key -> the replica fails to start.
        self._keys = ApiKeyCheck(read_api_keys(config.serve))
        self._policy = RequestPolicy.from_config(config, ImageTarget(**image_target) if image_target else None)
        # The same limits locally, used only while the shared limiter cannot be reached.
        self._limiter = SharedLimiter(rate_limiter, TokenBuckets(config.serve.rate_limit, config.serve.key_rate_limits))
        # The endpoint fetches allow-listed http(s) images itself: never from private, loopback or
        # link-local addresses (whatever fetch.allow_private_networks says for batch) and never local paths.
        policy = FetchSection(**{**config.fetch.model_dump(), "allow_private_networks": False,
                                 "allow_local_paths": False})
        self._fetcher = Fetcher(policy, config.storage, max_bytes=config.images.max_bytes)
        logger.info("ingress guard ready: %d API keys, model %s, image hosts %s, images at %d px, rate limit "
                    "%s per key (%d keys with their own), %s", self._keys.count, config.model.served_name,
                    sorted(self._policy.allowed_image_domains) or "none", self._policy.image_target.size_px,
                    config.serve.rate_limit.model_dump(), len(config.serve.key_rate_limits),
                    "shared" if rate_limiter is not None else "local to this replica")

    async def __serve_build_asgi_app__(self):
        """Called by the Serve replica before the app starts: add the guard, open probes, error shape."""
        app = self.app
        app.add_exception_handler(RequestValidationError, _validation_error_response)
        app.add_exception_handler(VLLMValidationError, _vllm_validation_error_response)
        # An engine replica lost under a request (its node preempted): a retryable 503, where Ray's own
        # handler would answer a 500 (errors.LOST_REPLICA_ERRORS says why).
        for lost in (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError):
            app.add_exception_handler(lost, _lost_replica_response)
        app.add_api_route("/health", _health, methods=["GET"])
        app.add_api_route("/ready", self._ready, methods=["GET"])
        app.add_middleware(GuardMiddleware, keys=self._keys, policy=self._policy, fetch_image=self._fetcher.fetch,
                           limiter=self._limiter)
        return app

    async def _ready(self) -> JSONResponse:
        """Ready when every model deployment answers its health check (so at least one replica runs)."""
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                for model_id, handle in self._default_serve_handles.items():
                    await handle.check_health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the reason is reported
            return JSONResponse({"status": "not ready", "reason": f"{type(exc).__name__}: {exc}"[:500]},
                                status_code=503)
        return JSONResponse({"status": "ready", "models": sorted(self._default_serve_handles)})


async def _health() -> dict[str, str]:
    return {"status": "ok"}


async def _validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = validation_error(exc.errors())
    return JSONResponse(error.body(), status_code=error.status)


async def _vllm_validation_error_response(request: Request, exc: VLLMValidationError) -> JSONResponse:
    """vLLM's request models raise this from their cross-field checks (e.g. tool_choice without tools)
    while FastAPI parses the body; it names the parameter, which Ray's generic handler drops."""
    error = ApiError(400, str(exc), param=exc.parameter, code="invalid_value")
    return JSONResponse(error.body(), status_code=error.status)


async def _lost_replica_response(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("%s %s: engine replica lost (%s: %s)", request.method, request.url.path, type(exc).__name__,
                   str(exc)[:300])
    error = lost_replica_error()
    return JSONResponse(error.body(), status_code=error.status)
