"""Per-API-key rate limits of the endpoint: requests and tokens per minute, as token buckets.

    key_id(key)          -> str        the name of a key in config and logs (16 hex digits of its SHA-256)
    TokenBuckets                       the buckets of every key (pure; the clock is injectable)
    RateLimiter                        the Serve deployment that holds the one shared TokenBuckets
    limiter_app(config)  -> Application  that deployment, bound, for the ingress to call
    SharedLimiter                      what an ingress replica calls: the deployment, a local fallback,
                                       and a cache of keys already refused

Shared across ingress replicas: every replica asks the one `RateLimiter` replica (one small async call
per admitted request), so N ingress replicas do not give a key N times its limit. Rejected: a named
detached actor (outlives the app, needs its own lifecycle) and per-replica buckets (limits that grow
with the autoscaler).

Overhead: a key already refused is answered from the replica's cache until its buckets could admit
a request again, so a flooding key costs one lookup per request and no call. If the limiter cannot be
reached within LIMITER_TIMEOUT_S (restarting), the replica applies the same limits with local buckets
and says so in its log, so a failure neither opens the endpoint to one key nor closes it to all.

Keys never appear here: the ingress passes key ids.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from pipeline.config import PipelineConfig, RateLimit

if TYPE_CHECKING:
    from ray.serve.deployment import Application

logger = logging.getLogger(__name__)

LIMITER_TIMEOUT_S = 2.0
# A key idle this long has full buckets again; its entry is dropped (a minute refills any bucket).
IDLE_S = 60.0


def key_id(key: str) -> str:
    """The id of an API key in config (serve.key_rate_limits) and logs: 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.strip().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decision:
    """The limiter's answer for one request.

    allowed: admitted (its cost was taken from the buckets). Otherwise `retry_after_s` says when this
    request could pass, `limit` which bucket refused it ("requests" or "tokens"), `blocked_for_s` how
    long no request of this key can pass at all (the cacheable part), and `too_large` that the request
    alone needs more than a full bucket, so waiting never helps.
    """

    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""
    blocked_for_s: float = 0.0
    too_large: bool = False
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


class TokenBuckets:
    """Two token buckets per key (requests, tokens), each holding at most one minute's allowance and
    refilling continuously. A request is admitted only if both hold its cost; a refused one takes nothing."""

    def __init__(self, default: RateLimit, per_key: Optional[Mapping[str, RateLimit]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self._default = default
        self._per_key = dict(per_key or {})
        self._clock = clock
        self._state: dict[str, tuple[float, float, float]] = {}  # key id -> (requests, tokens, time)
        self._last_prune = clock()

    def limit_for(self, key: str) -> RateLimit:
        return self._per_key.get(key, self._default)

    def acquire(self, key: str, tokens: int) -> Decision:
        limit = self.limit_for(key)
        rpm, tpm = limit.requests_per_minute, limit.tokens_per_minute
        now = self._clock()
        self._prune(now)
        requests_level, tokens_level, then = self._state.get(key, (float(rpm), float(tpm), now))
        elapsed = max(0.0, now - then)
        requests_level = min(float(rpm), requests_level + elapsed * rpm / 60.0)
        tokens_level = min(float(tpm), tokens_level + elapsed * tpm / 60.0)
        limits = {"requests_per_minute": rpm, "tokens_per_minute": tpm}
        if tokens > tpm:
            self._state[key] = (requests_level, tokens_level, now)
            return Decision(False, limit="tokens", too_large=True, **limits)
        if requests_level >= 1.0 and tokens_level >= tokens:
            self._state[key] = (requests_level - 1.0, tokens_level - tokens, now)
            return Decision(True, **limits)
        self._state[key] = (requests_level, tokens_level, now)
        wait_requests = max(0.0, (1.0 - requests_level) * 60.0 / rpm)
        wait_tokens = max(0.0, (tokens - tokens_level) * 60.0 / tpm)
        # No request at all can pass before the requests bucket holds one and the tokens bucket holds
        # at least a token: that much of the wait holds for every request of this key.
        blocked = max(wait_requests, max(0.0, (1.0 - tokens_level) * 60.0 / tpm))
        return Decision(False, retry_after_s=max(wait_requests, wait_tokens),
                        limit="requests" if wait_requests >= wait_tokens else "tokens", blocked_for_s=blocked,
                        **limits)

    def _prune(self, now: float) -> None:
        if now - self._last_prune < IDLE_S:
            return
        self._last_prune = now
        for key in [k for k, (_, _, then) in self._state.items() if now - then > IDLE_S]:
            del self._state[key]


class RateLimiter:
    """The Serve deployment holding every key's buckets (one replica; see limiter_app)."""

    def __init__(self, default: dict[str, Any], per_key: dict[str, dict[str, Any]]):
        self._buckets = TokenBuckets(RateLimit(**default), {k: RateLimit(**v) for k, v in per_key.items()})
        logger.info("rate limiter ready: %s per key by default, %d keys with their own limits", default, len(per_key))

    async def acquire(self, key: str, tokens: int) -> Decision:
        # Synchronous inside: no await between reading and writing a key's buckets, so concurrent calls
        # on this replica's event loop cannot both spend the same tokens.
        return self._buckets.acquire(key, tokens)


def limiter_app(config: PipelineConfig) -> "Application":
    """The limiter deployment, bound: pass it in the ingress's kwargs and Serve hands the ingress a handle."""
    from ray import serve

    serve_config = config.serve
    return serve.deployment(
        RateLimiter, name="RateLimiter", num_replicas=1,
        # Every request of every ingress replica passes here: its calls must not queue behind Serve's
        # default of 5 ongoing requests. It needs no CPU reservation: a dictionary update per call.
        max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0},
    ).bind(serve_config.rate_limit.model_dump(),
           {k: v.model_dump() for k, v in serve_config.key_rate_limits.items()})


class SharedLimiter:
    """An ingress replica's view of the limiter: the shared deployment, with a cache and a fallback."""

    def __init__(self, handle: Any, fallback: TokenBuckets, clock: Callable[[], float] = time.monotonic,
                 timeout_s: float = LIMITER_TIMEOUT_S):
        self._handle = handle
        self._fallback = fallback
        self._clock = clock
        self._timeout_s = timeout_s
        self._blocked_until: dict[str, tuple[float, Decision]] = {}
        self._fallback_logged = 0.0

    def cached_refusal(self, key: str) -> Optional[Decision]:
        """A refusal still in force for this key, answered without asking the limiter."""
        entry = self._blocked_until.get(key)
        if entry is None:
            return None
        until, decision = entry
        left = until - self._clock()
        if left <= 0:
            del self._blocked_until[key]
            return None
        return Decision(False, retry_after_s=left, limit=decision.limit, blocked_for_s=left,
                        requests_per_minute=decision.requests_per_minute,
                        tokens_per_minute=decision.tokens_per_minute)

    async def acquire(self, key: str, tokens: int) -> Decision:
        decision = await self._ask(key, tokens)
        if not decision.allowed and decision.blocked_for_s > 0:
            self._blocked_until[key] = (self._clock() + decision.blocked_for_s, decision)
        return decision

    async def _ask(self, key: str, tokens: int) -> Decision:
        if self._handle is None:
            return self._fallback.acquire(key, tokens)
        try:
            return await asyncio.wait_for(_awaited(self._handle.acquire.remote(key, tokens)), self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure of the shared limiter: limit locally instead
            now = self._clock()
            if now - self._fallback_logged > 60:
                self._fallback_logged = now
                logger.warning("rate limiter unreachable (%s: %s); this replica limits keys on its own",
                               type(exc).__name__, str(exc)[:200])
            return self._fallback.acquire(key, tokens)


async def _awaited(response: Any) -> Any:
    return await response


def retry_after_header(decision: Decision) -> str:
    """Whole seconds, at least 1 (HTTP's Retry-After has no fractions)."""
    return str(max(1, math.ceil(decision.retry_after_s)))


def main() -> None:
    """Print the key id of each API key read from stdin (one per line; # comments skipped)."""
    for line in sys.stdin:
        key = line.strip()
        if key and not key.startswith("#"):
            print(key_id(key))


if __name__ == "__main__":
    main()
