"""jobs.parity's refusals before any engine starts, and its printed summary."""
import pytest

from jobs.parity import format_summary, main


def test_an_invalid_candidate_is_refused_before_any_engine_starts(tmp_path, caplog):
    assert main(["--input", str(tmp_path), "--candidate", "engine.kv_cache_dtype=int8"]) == 2
    assert "engine.kv_cache_dtype: Input should be 'auto', 'fp8'" in caplog.text


def test_rows_must_be_positive(tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["--input", str(tmp_path), "--rows", "0"])
    assert exited.value.code == 2


def test_summary_names_the_change_and_every_number():
    report = {"settings_diff": {"engine.kv_cache_dtype": ["auto", "fp8"]}, "refused_records": [{"id": "x"}],
              "summary": {"prompts": 3, "identical_outputs": 2, "identical_share": 2 / 3, "mean_agreement": 0.9,
                          "min_agreement": 0.7, "mean_abs_logprob_delta": 0.01, "p95_abs_logprob_delta": 0.02,
                          "max_abs_logprob_delta": 0.05, "diverged": 1, "diverged_at_near_tie": 1,
                          "median_divergence_margin": 0.03}}
    text = format_summary(report)
    assert "parity of 3 records (1 refused by preparation), changed: engine.kv_cache_dtype: 'auto' -> 'fp8'" in text
    assert "identical outputs   2/3 (66.7%)" in text
    assert "mean 0.900, worst 0.700" in text
    assert "outputs that differ 1, at a near tie 1, median margin 0.030 nats" in text
