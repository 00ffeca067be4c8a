"""bench.online_cpu_cost: which process is which, and CPU per request from two readings of the tree."""
import pytest

from bench import online_cpu_cost as C


@pytest.mark.parametrize("title, role", [
    ("ray::ServeReplica:gemma:GuardedIngress.handle_request_with_rejection", "ingress"),
    ("ray::ServeReplica:gemma:WarmLLMServer:gemma-3-12b-it.handle_request_with_rejection", "engine replica"),
    ("ray::ProxyActor.receive_asgi_messages", "proxy"),
    ("VLLM::EngineCore", "engine core"),
    ("VLLM::Worker", "engine worker"),
    ("ray::RayWorkerProc.run", "engine worker"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "raylet"),
    ("/venv/bin/python -m jobs.serve --config configs/tiny-cpu.yaml", "driver"),
    ("ray::IDLE", "other"),
])
def test_processes_are_named_by_their_title(title, role):
    assert C.role_of(title) == role


def test_cpu_per_request_sums_a_roles_processes_and_counts_a_process_born_in_the_window():
    before = {1: ("ingress", "ray::ServeReplica:gemma:GuardedIngress", 10.0),
              2: ("ingress", "ray::ServeReplica:gemma:GuardedIngress", 4.0),
              3: ("other", "ray::IDLE", 1.0)}
    after = {1: ("ingress", "ray::ServeReplica:gemma:GuardedIngress", 11.0),
             2: ("ingress", "ray::ServeReplica:gemma:GuardedIngress", 4.5),
             3: ("other", "ray::IDLE", 1.1),
             4: ("other", "ray::TelemetryAgent", 0.2)}  # started after the first reading: all of it counts
    per_role, others = C.per_request(C.used_in_window(before, after), requests=10)
    assert per_role == {"ingress": 150.0, "other": 30.0}
    assert others == [("ray::TelemetryAgent", 20.0), ("ray::IDLE", 10.0)]
