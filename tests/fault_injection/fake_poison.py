"""FakePoison: a test-only vLLM general plugin that kills the engine core on a marked prompt.

Why a fake: a poison record is an input on which the real engine process dies every time (a kernel fault
on one shape, a tokenizer edge case in a native library). None can be produced on purpose with a tiny
random-weight model on CPU, so this plugin stands in for the fault itself, and only for it: the request
reaches vLLM's real engine core, which dies by SIGKILL as a segfaulting process would; vLLM's front-end
then raises its real EngineDeadError, Ray's engine UDF exits its actor, Ray restarts it and retries the
task, and pipeline.stages.crash_isolation must isolate the record. Everything around the fault is real.

Off unless the variable named by FAKE_POISON_ENV holds comma-separated token ids (the test sets it in the
job's own environment, which the embedded Ray cluster's workers inherit and vLLM's engine core from them):
then a request whose prompt token ids contain that sequence kills the engine core process that receives it.

Registered as the `fake_poison` entry point of `vllm.general_plugins` by the test-only distribution in this
directory (tests/fault_injection/pyproject.toml, installed by `make test`), never by the production
package; vLLM runs general plugins in every process it starts, and the engine core is the one that matters.
Neither the package nor its config can switch a fault injector on.
"""
from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

FAKE_POISON_ENV = "PIPELINE_FAKE_POISON_TOKEN_IDS"


def contains(sequence: list[int], marker: list[int]) -> bool:
    width = len(marker)
    return width > 0 and any(sequence[i:i + width] == marker for i in range(len(sequence) - width + 1))


def register() -> None:
    raw = os.environ.get(FAKE_POISON_ENV, "").strip()
    if not raw:
        return
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore.add_request, "fake_poison", False):
        return
    marker = [int(token) for token in raw.split(",")]
    original = EngineCore.add_request

    def add_request(self, request, request_wave: int = 0):
        if contains(list(request.prompt_token_ids or []), marker):
            logger.error("FakePoison: request %s holds the marker %s; killing engine core pid %d",
                         request.request_id, marker, os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, request, request_wave)

    add_request.fake_poison = True
    EngineCore.add_request = add_request
    logger.warning("FakePoison armed in pid %d: prompts holding token ids %s kill the engine core", os.getpid(),
                   marker)
