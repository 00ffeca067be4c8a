"""The online endpoint that test_serve_e2e.py and test_tools_e2e.py share: deploying it costs a minute or
more here, so one `python -m jobs.serve` serves both and stops after the last integration test."""
import pytest

from pipeline.serve.limits import key_id
from tests.conftest import serve_endpoint

SERVE_E2E_KEYS = ("first-test-key", "second-test-key")
TOOLS_KEY = "tools-test-key"
# Keys with their own low rate limits (serve.key_rate_limits), each used by one test of test_serve_e2e.py:
# the 429 test and the flood of the load test. Every other key keeps the default limits.
LIMITED_KEY, LIMITED_RPM = "limited-test-key", 3
FLOOD_KEY, FLOOD_RPM, FLOOD_TPM = "flood-test-key", 2, 300


@pytest.fixture(scope="package")
def shared_endpoint(tiny_model, tmp_path_factory):
    """Its base URL. The settings are both modules': test_serve_e2e.py's request guards and tiny queue
    (2 running + 2 waiting, so that overload is reachable), n and prompt lists of up to 4 (so that the
    cap on their product is reachable), two low-limit keys, two ingress replicas (so that the rate
    limiter is shown shared by both), and the tools batch job's engine.max_model_len=2048, which the
    tools tests need the endpoint to match. The tools tests send one request at a time, so the small
    queue never refuses them."""
    key_limits = (f'{{"{key_id(LIMITED_KEY)}": {{requests_per_minute: {LIMITED_RPM}}}, '
                  f'"{key_id(FLOOD_KEY)}": {{requests_per_minute: {FLOOD_RPM}, tokens_per_minute: {FLOOD_TPM}}}}}')
    with serve_endpoint(tiny_model, tmp_path_factory.mktemp("serve"),
                        [*SERVE_E2E_KEYS, TOOLS_KEY, LIMITED_KEY, FLOOD_KEY],
                        "engine.max_model_len=2048",
                        "serve.max_ongoing_requests=2", "serve.max_queued_requests=2",
                        "serve.target_ongoing_requests=1", "serve.max_tokens_cap=256",
                        "serve.max_body_bytes=2000000", "serve.allowed_image_domains=[localhost]",
                        "serve.max_n=4", "serve.max_prompts_per_request=4",
                        "serve.ingress_min_replicas=2", "serve.ingress_max_replicas=2", "serve.ingress_num_cpus=0",
                        f"serve.key_rate_limits={key_limits}",
                        ready_timeout_s=600) as base:
        yield base
