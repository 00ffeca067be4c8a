"""jobs.serve refuses what would fail later with exit code 2 and a message, before Ray starts."""
import json
import logging

import pytest

from jobs import serve


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("GEMMA_API_KEYS", raising=False)


def run(argv, caplog):
    with caplog.at_level(logging.ERROR, logger="jobs.serve"):
        code = serve.main(argv)
    return code, caplog.text


def test_no_api_key_is_refused_before_ray(caplog):
    code, log = run(["--set", "serve.api_keys_env=NO_SUCH_KEYS_VARIABLE"], caplog)
    assert code == 2 and "no API key: set $NO_SUCH_KEYS_VARIABLE" in log


def test_invalid_serve_field(caplog):
    code, log = run(["--set", "serve.max_replica=3"], caplog)
    assert code == 2 and "serve.max_replica: unknown field" in log


def test_wrong_checkpoint_scheme_is_refused_before_ray(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("GEMMA_API_KEYS", "k")
    model = tmp_path / "bf16-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    code, log = run(["--model", str(model)], caplog)
    assert code == 2 and "holds scheme 'none' but model.quantization is 'fp8-dynamic'" in log
