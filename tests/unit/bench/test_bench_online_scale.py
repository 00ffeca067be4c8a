"""The scale-up run's bookkeeping (bench/online_scale.py): the replica timeline read from a real
jobs.serve log excerpt, and the rising load against a stand-in request (a local coroutine, named as such:
what is tested is the step, hold and logging logic, not a server)."""
import asyncio
import time
from datetime import datetime
from pathlib import Path

import pytest

from bench.online_scale import replica_timeline, rising_load

# Lines as jobs.serve printed them on the H200 (2026-12-03), colour codes included.
LOG = """\x1b[36m(ServeController pid=6386)\x1b[0m INFO 2026-12-03 07:20:31,520 controller 6386 -- Adding 1 replica to Deployment(name='WarmLLMServer:gemma-3-12b-it', app='gemma').
\x1b[36m(ServeController pid=6386)\x1b[0m INFO 2026-12-03 07:20:31,526 controller 6386 -- Adding 1 replica to Deployment(name='GuardedIngress', app='gemma').
\x1b[36m(ServeReplica:gemma:WarmLLMServer:gemma-3-12b-it pid=7271)\x1b[0m INFO 2026-12-03 07:22:38,003 gemma_WarmLLMServer:gemma-3-12b-it ptsq2yux -- warm-up image: ok in 2.07s
\x1b[36m(ServeReplica:gemma:WarmLLMServer:gemma-3-12b-it pid=7271)\x1b[0m INFO 2026-12-03 07:22:39,486 gemma_WarmLLMServer:gemma-3-12b-it ptsq2yux -- warm-up tool call: ok in 1.48s
"""


def test_timeline_names_engine_decisions_and_each_replica_once():
    second = ("\x1b[36m(ServeReplica:gemma:WarmLLMServer:gemma-3-12b-it pid=9)\x1b[0m INFO 2026-12-03 07:25:01,000 "
              "gemma_WarmLLMServer:gemma-3-12b-it abcd1234 -- warm-up image: ok in 1.90s\n")
    timeline = replica_timeline(LOG + second + LOG.splitlines()[2] + "\n")
    assert [d["deployment"] for d in timeline["scale_decisions"]] == ["WarmLLMServer:gemma-3-12b-it"]
    assert [w["replica"] for w in timeline["replicas_warmed_up"]] == ["ptsq2yux", "abcd1234"]
    assert timeline["replicas_warmed_up"][1]["at"] - timeline["replicas_warmed_up"][0]["at"] == pytest.approx(142.997)


def test_rising_load_holds_until_the_second_replica_and_logs_every_request(tmp_path: Path):
    log_path = tmp_path / "server.log"
    log_path.write_text(LOG)
    calls = 0

    async def stand_in_request():
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("boom")
        if calls == 30:  # the second replica is ready while the top step runs: a warm-up line stamped now
            now = datetime.fromtimestamp(time.time()).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
            line = LOG.splitlines()[2].replace("ptsq2yux", "second01").replace("2026-12-03 07:22:38,003", now)
            log_path.write_text(LOG + line + "\n")
        await asyncio.sleep(0.01)
        return 0.01, 0.005

    result = asyncio.run(rising_load(stand_in_request, [(1, 0.1), (4, 0.1)], log_path, wait_limit_s=5, after_s=0.2))
    assert result["requests"] == len(result["request_log"]) == calls
    assert result["failed"] == 1 and list(result["failures_by_kind"]) == ["RuntimeError: boom"]
    assert [s["streams"] for s in result["steps"]] == [1, 4]
    assert {e["streams"] for e in result["request_log"]} == {1, 2, 3, 4}
    assert len(result["timeline"]["replicas_warmed_up"]) == 2
    assert [p["phase"] for p in result["per_replica_phase"]] == ["one replica", "two replicas"]
    assert calls > 30  # it held the top step after the second replica warmed up


@pytest.mark.parametrize("target", ["ours", "ours-ray", "ours-scale"])
def test_every_ours_target_is_a_valid_configuration(target: str):
    """The H200 lease of 2026-12-03 lost its scale-up run to jobs.serve refusing the target's settings
    (gpu_share 0.5 without kv_cache_memory_bytes): each target's --config and --set go through the real loader."""
    from bench.online_gpu import target_command
    from pipeline.config import PipelineConfig
    from tests.conftest import ROOT

    command, _ = target_command(target, "/ckpt", 18300, "k", str(ROOT / "configs/gpu-fp8.yaml"), [])
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    config = PipelineConfig.load(command[command.index("--config") + 1], sets)
    assert config.serve.port == 18300
    assert config.serve.in_process_engine is (target != "ours-ray")
    if target == "ours-scale":
        assert (config.engine.gpu_share, config.serve.max_replicas) == (0.5, 2)
        assert config.engine.kv_cache_memory_bytes == 16 * 2**30
