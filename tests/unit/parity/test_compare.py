"""The parity arithmetic on hand-made outputs (no engine): agreement, shared-token deltas, near ties."""
import math

import pytest

from pipeline.parity.compare import NEAR_TIE_NATS, Decoded, compare, compare_prompt


def decoded(tokens, logprobs):
    """`logprobs`: per position, {token: logprob} (the chosen token included)."""
    return Decoded(tokens=tuple(tokens), top_logprobs=tuple(logprobs))


def test_identical_outputs_agree_fully_and_report_the_logprob_drift():
    base = decoded([5, 6, 7], [{5: -0.1, 9: -2.0}, {6: -0.2}, {7: -0.3}])
    cand = decoded([5, 6, 7], [{5: -0.15, 9: -2.0}, {6: -0.2}, {7: -0.6}])
    result = compare_prompt(base, cand)
    assert result.identical and result.agreement == 1.0 and result.shared_prefix == 3
    assert result.mean_abs_logprob_delta == pytest.approx((0.05 + 0.0 + 0.3) / 3)
    assert result.max_abs_logprob_delta == pytest.approx(0.3)
    assert result.divergence_margin is None


def test_divergence_stops_the_comparison_and_measures_the_baseline_margin():
    # Position 1 is a near tie for the baseline (6 at -0.70 vs 8 at -0.72): the candidate picks 8.
    base = decoded([5, 6, 7, 7], [{5: -0.1}, {6: -0.70, 8: -0.72}, {7: -0.1}, {7: -0.1}])
    cand = decoded([5, 8, 1], [{5: -0.1}, {8: -0.69, 6: -0.71}, {1: -5.0}])
    result = compare_prompt(base, cand)
    assert not result.identical
    assert result.shared_prefix == 1
    assert result.agreement == pytest.approx(1 / 4)   # of the longer output
    assert result.divergence_margin == pytest.approx(0.02)
    # Positions after the divergence condition on different texts and are not compared.
    assert result.max_abs_logprob_delta == 0.0


def test_a_candidate_token_outside_the_baseline_top_k_has_no_margin():
    base = decoded([5, 6], [{5: -0.1}, {6: -0.01}])
    cand = decoded([5, 3], [{5: -0.1}, {3: -0.5}])
    assert compare_prompt(base, cand).divergence_margin is None


def test_one_output_a_prefix_of_the_other():
    base = decoded([5, 6], [{5: -0.1}, {6: -0.1}])
    cand = decoded([5, 6, 2], [{5: -0.1}, {6: -0.1}, {2: -0.1}])
    result = compare_prompt(base, cand)
    assert not result.identical and result.agreement == pytest.approx(2 / 3)
    assert result.divergence_margin is None


def test_summary_counts_near_ties_and_refuses_unequal_sides():
    same = decoded([1], [{1: -0.1}])
    tie = (decoded([1, 2], [{1: -0.1}, {2: -0.5, 3: -0.5 - NEAR_TIE_NATS / 2}]),
           decoded([1, 3], [{1: -0.1}, {3: -0.4}]))
    real = (decoded([1, 2], [{1: -0.1}, {2: -0.1, 3: -3.0}]), decoded([1, 3], [{1: -0.1}, {3: -0.2}]))
    prompts, summary = compare([same, tie[0], real[0]], [same, tie[1], real[1]])
    assert summary["prompts"] == 3 and summary["identical_outputs"] == 1
    assert summary["diverged"] == 2 and summary["diverged_at_near_tie"] == 1
    assert summary["mean_agreement"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert summary["min_agreement"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 baseline outputs but 2"):
        compare([same], [same, same])


def test_json_round_trip_keeps_tokens_and_logprobs():
    original = decoded([5, 6], [{5: -0.1, 9: -2.5}, {6: -0.25}])
    again = Decoded.from_json(original.to_json())
    assert again == original
    assert not math.isnan(compare_prompt(original, again).agreement)
