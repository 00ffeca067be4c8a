"""jobs.parity end to end on the real vLLM CPU engine: the baseline and an fp8 KV cache candidate, each in its
own engine process, over records prepared as the caption job prepares them (one of them not an image)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.testing.sample_data import sample_images
from tests.conftest import TINY_CPU_CONFIG, run_job

pytestmark = pytest.mark.integration

PROMPTS = ["Describe the image.", "What colours do you see?", "Write a one-line caption.", "Is it day or night?"]


def test_parity_of_an_fp8_kv_cache_against_the_bf16_baseline(tiny_model, tmp_path):
    images = sample_images(len(PROMPTS))
    records = [{"id": f"r{i}", "image": image.data, "prompt": prompt}
               for i, (image, prompt) in enumerate(zip(images, PROMPTS))]
    records.insert(2, {"id": "not-an-image", "image": b"GIF89a but not really", "prompt": "x"})
    records.append({"id": "beyond-rows", "image": images[0].data, "prompt": "never read: past --rows"})
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in" / "records.parquet")
    report_path = tmp_path / "parity.json"

    # The tiny random model is far more sensitive to fp8 rounding than a trained one: its mean agreement is
    # well below 0.99, so the gate answers 3 and the report is still printed and written.
    done = run_job("jobs.parity", "--input", str(tmp_path / "in"), "--config", str(TINY_CPU_CONFIG),
                   "--set", f"model.source={tiny_model}", "--candidate", "engine.kv_cache_dtype=fp8",
                   "--rows", "5", "--max-tokens", "12", "--top-logprobs", "8", "--output", str(report_path),
                   "--min-agreement", "0.99", timeout_s=600)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "is below --min-agreement 0.990" in done.stderr
    assert "changed: engine.kv_cache_dtype: 'auto' -> 'fp8'" in done.stdout
    assert "parity of 4 records (1 refused by preparation)" in done.stdout

    report = json.loads(report_path.read_text())
    assert report["settings_diff"] == {"engine.kv_cache_dtype": ["auto", "fp8"]}
    assert report["decoding"] == {"greedy": True, "max_tokens": 12, "top_logprobs": 8}
    assert [r["id"] for r in report["refused_records"]] == ["not-an-image"]
    assert report["refused_records"][0]["error"].startswith("not_an_image:")
    assert [r["id"] for r in report["records"]] == ["r0", "r1", "r2", "r3"]   # input order, beyond --rows unread
    summary = report["summary"]
    assert summary["prompts"] == 4
    for row in report["records"]:
        assert row["baseline_tokens"] == row["candidate_tokens"] == 12   # random weights never stop early
        assert 0 <= row["shared_prefix"] <= 12 and row["agreement"] == row["shared_prefix"] / 12
        assert row["baseline_text"] and row["candidate_text"]
        assert row["identical"] == (row["baseline_text"] == row["candidate_text"])
    # The fp8 cache changed the numbers: some shared token's log-probability moved, or an output differs.
    assert summary["max_abs_logprob_delta"] > 0 or summary["diverged"] > 0
    assert summary["mean_agreement"] < 0.99
