"""The online endpoint that test_serve_e2e.py and test_tools_e2e.py share: deploying it costs a minute or
more here, so one `python -m jobs.serve` serves both and stops after the last integration test."""
import pytest

from tests.conftest import serve_endpoint

SERVE_E2E_KEYS = ("first-test-key", "second-test-key")
TOOLS_KEY = "tools-test-key"


@pytest.fixture(scope="package")
def shared_endpoint(tiny_model, tmp_path_factory):
    """Its base URL. The settings are both modules': test_serve_e2e.py's request guards and tiny queue
    (2 running + 2 waiting, so that overload is reachable), and the tools batch job's
    engine.max_model_len=2048, which the tools tests need the endpoint to match. The tools tests send one
    request at a time, so the small queue never refuses them."""
    with serve_endpoint(tiny_model, tmp_path_factory.mktemp("serve"), [*SERVE_E2E_KEYS, TOOLS_KEY],
                        "engine.max_model_len=2048",
                        "serve.max_ongoing_requests=2", "serve.max_queued_requests=2",
                        "serve.target_ongoing_requests=1", "serve.max_tokens_cap=256",
                        "serve.max_body_bytes=2000000", "serve.allowed_image_domains=[localhost]",
                        ready_timeout_s=600) as base:
        yield base
