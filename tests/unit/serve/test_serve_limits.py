"""The per-key rate limiter: token buckets, the Serve deployment's method, and an ingress replica's view
(cache of refusals, fallback when the shared limiter is unreachable). Pure: a fake clock, no Ray."""
import asyncio
import io
import sys

import pytest

from pipeline.config import ConfigError, PipelineConfig, RateLimit
from pipeline.serve.limits import (Decision, RateLimiter, SharedLimiter, TokenBuckets, key_id, main,
                                   retry_after_header)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_requests_per_minute():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(requests_per_minute=3, tokens_per_minute=10_000), clock=clock)
    assert [buckets.acquire("k", 10).allowed for _ in range(3)] == [True, True, True], "a minute's burst"
    refused = buckets.acquire("k", 10)
    assert not refused.allowed and refused.limit == "requests"
    assert refused.retry_after_s == pytest.approx(20.0) and refused.blocked_for_s == pytest.approx(20.0)
    clock.now += 19.9
    assert not buckets.acquire("k", 10).allowed
    clock.now += 0.1
    assert buckets.acquire("k", 10).allowed, "one request refills every 60/3 s"
    assert not buckets.acquire("k", 10).allowed


def test_tokens_per_minute_and_requests_larger_than_the_bucket():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(requests_per_minute=100, tokens_per_minute=600), clock=clock)
    assert buckets.acquire("k", 500).allowed
    refused = buckets.acquire("k", 300)
    assert not refused.allowed and refused.limit == "tokens"
    assert refused.retry_after_s == pytest.approx(20.0), "200 more tokens at 10 per second"
    assert refused.blocked_for_s == 0.0, "a smaller request could still pass"
    assert buckets.acquire("k", 100).allowed, "a refused request took nothing"
    too_large = buckets.acquire("k", 601)
    assert not too_large.allowed and too_large.too_large and too_large.tokens_per_minute == 600


def test_keys_have_their_own_buckets_and_limits():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(requests_per_minute=2, tokens_per_minute=1000),
                           {"slow": RateLimit(requests_per_minute=1, tokens_per_minute=1000)}, clock=clock)
    assert buckets.acquire("slow", 1).allowed and not buckets.acquire("slow", 1).allowed
    assert buckets.acquire("other", 1).allowed and buckets.acquire("other", 1).allowed
    assert not buckets.acquire("other", 1).allowed
    assert buckets.acquire("third", 1).allowed
    clock.now += 61  # idle keys are full again (and their entries dropped)
    assert buckets.acquire("slow", 1).allowed and buckets.acquire("other", 1).allowed


def test_the_deployment_class_holds_one_set_of_buckets():
    limiter = RateLimiter({"requests_per_minute": 2, "tokens_per_minute": 100},
                          {"abcdefabcdefabcd": {"requests_per_minute": 5, "tokens_per_minute": 100}})

    async def many(key, count):
        return await asyncio.gather(*(limiter.acquire(key, 1) for _ in range(count)))

    assert sum(d.allowed for d in asyncio.run(many("0000000000000000", 10))) == 2
    assert sum(d.allowed for d in asyncio.run(many("abcdefabcdefabcd", 10))) == 5


class FakeHandle:
    """Stands in for the DeploymentHandle of the RateLimiter deployment (Ray Serve runs it in the
    integration tests): `.acquire.remote(...)` returns an awaitable, as a DeploymentResponse is."""

    def __init__(self, limiter=None, fail=None, delay_s=0.0):
        self.calls = 0
        outer = self

        class Method:
            def remote(self, key, tokens):
                outer.calls += 1

                async def answer():
                    await asyncio.sleep(delay_s)
                    if fail:
                        raise fail
                    return await limiter.acquire(key, tokens)
                return answer()

        self.acquire = Method()


def test_refusals_are_cached_until_a_request_could_pass():
    clock = Clock()
    shared = RateLimiter({"requests_per_minute": 1, "tokens_per_minute": 100}, {})
    handle = FakeHandle(shared)
    limiter = SharedLimiter(handle, TokenBuckets(RateLimit()), clock=clock)

    async def run():
        assert (await limiter.acquire("k", 1)).allowed
        refused = await limiter.acquire("k", 1)
        assert not refused.allowed
        assert handle.calls == 2
        cached = limiter.cached_refusal("k")
        assert cached is not None and 0 < cached.retry_after_s <= 60 and cached.requests_per_minute == 1
        assert limiter.cached_refusal("other") is None
        clock.now += 61
        assert limiter.cached_refusal("k") is None

    asyncio.run(run())


@pytest.mark.parametrize("handle", [
    pytest.param(FakeHandle(fail=RuntimeError("replica restarting")), id="error"),
    pytest.param(FakeHandle(RateLimiter({"requests_per_minute": 100, "tokens_per_minute": 100}, {}), delay_s=5),
                 id="timeout"),
])
def test_an_unreachable_limiter_falls_back_to_local_buckets(handle, caplog):
    limiter = SharedLimiter(handle, TokenBuckets(RateLimit(requests_per_minute=2, tokens_per_minute=100)),
                            timeout_s=0.2)

    async def run():
        return [(await limiter.acquire("k", 1)).allowed for _ in range(3)]

    assert asyncio.run(run()) == [True, True, False], "the same limits, kept by this replica"
    assert "rate limiter unreachable" in caplog.text and "this replica limits keys on its own" in caplog.text


def test_retry_after_is_whole_seconds():
    assert retry_after_header(Decision(False, retry_after_s=0.01)) == "1"
    assert retry_after_header(Decision(False, retry_after_s=20.0)) == "20"
    assert retry_after_header(Decision(False, retry_after_s=20.2)) == "21"


def test_key_ids_and_their_config(monkeypatch, capsys):
    assert key_id("secret-key") == key_id(" secret-key\n") and len(key_id("secret-key")) == 16
    assert key_id("secret-key") != key_id("secret-kez")
    monkeypatch.setattr(sys, "stdin", io.StringIO("# keys\nsecret-key\n\nother-key\n"))
    main()
    assert capsys.readouterr().out.split() == [key_id("secret-key"), key_id("other-key")]
    config = PipelineConfig.load(overrides=[f'serve.key_rate_limits={{"{key_id("secret-key")}": '
                                            "{requests_per_minute: 5}}"], environ={})
    assert config.serve.key_rate_limits[key_id("secret-key")] == RateLimit(requests_per_minute=5)
    with pytest.raises(ConfigError) as info:
        PipelineConfig.load(overrides=["serve.key_rate_limits={my-real-secret-key: {requests_per_minute: 5}}"],
                            environ={})
    assert "16 lowercase hex digits" in str(info.value) and "my-real" not in str(info.value)
