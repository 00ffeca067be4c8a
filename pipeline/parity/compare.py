"""Token agreement and logprob divergence between two engine settings' greedy outputs.

Both settings decode the same prompts greedily. Up to the first token where they differ, both sides
condition on the same text, so their log-probabilities of the same token compare directly; after it, the
two continuations are different texts and nothing more is compared. Three numbers per prompt follow:

- agreement: the share of the longer output that the two share before they differ (1.0 = identical);
- |d logprob|: how far the candidate's log-probability of each shared token is from the baseline's;
- the baseline's margin where they differ: its log-probability of its own token minus that of the
  candidate's token. A small margin is a near tie that any rounding can flip; a large one is a real change.

Pure Python, no engine: `pipeline.parity.side` produces the inputs, `pipeline.parity.run` calls this.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

# A flip whose baseline margin is below this (in nats) is counted as a near tie.
NEAR_TIE_NATS = 0.1


@dataclass(frozen=True)
class Decoded:
    """One prompt's greedy output on one setting: the tokens and, per position, the top log-probabilities."""

    tokens: tuple[int, ...]
    # Per position: token id -> log-probability, for the k most likely tokens (the chosen one included).
    top_logprobs: tuple[dict[int, float], ...]
    text: str = ""

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> "Decoded":
        return cls(tokens=tuple(int(t) for t in payload["tokens"]),
                   top_logprobs=tuple({int(t): float(lp) for t, lp in position}
                                      for position in payload["top_logprobs"]),
                   text=payload.get("text", ""))

    def to_json(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "text": self.text,
                "top_logprobs": [sorted(position.items(), key=lambda kv: -kv[1]) for position in self.top_logprobs]}


@dataclass(frozen=True)
class PromptParity:
    shared_prefix: int
    baseline_tokens: int
    candidate_tokens: int
    agreement: float
    identical: bool
    mean_abs_logprob_delta: float
    max_abs_logprob_delta: float
    # None when the outputs are identical, or when the candidate's token is outside the baseline's top k.
    divergence_margin: Optional[float]


def compare_prompt(baseline: Decoded, candidate: Decoded) -> PromptParity:
    shared = 0
    for b, c in zip(baseline.tokens, candidate.tokens):
        if b != c:
            break
        shared += 1
    longest = max(len(baseline.tokens), len(candidate.tokens))
    deltas = []
    for i in range(shared):
        token = baseline.tokens[i]
        before, after = baseline.top_logprobs[i].get(token), candidate.top_logprobs[i].get(token)
        if before is not None and after is not None:
            deltas.append(abs(before - after))
    identical = baseline.tokens == candidate.tokens
    margin = None
    if not identical and shared < min(len(baseline.tokens), len(candidate.tokens)):
        position = baseline.top_logprobs[shared]
        own, other = position.get(baseline.tokens[shared]), position.get(candidate.tokens[shared])
        if own is not None and other is not None:
            margin = own - other
    return PromptParity(
        shared_prefix=shared, baseline_tokens=len(baseline.tokens), candidate_tokens=len(candidate.tokens),
        agreement=shared / longest if longest else 1.0, identical=identical,
        mean_abs_logprob_delta=sum(deltas) / len(deltas) if deltas else 0.0,
        max_abs_logprob_delta=max(deltas, default=0.0), divergence_margin=margin)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(prompts: Sequence[PromptParity]) -> dict[str, Any]:
    """The whole comparison in numbers a user can put a threshold on."""
    n = len(prompts)
    flips = [p for p in prompts if not p.identical]
    margins = [p.divergence_margin for p in flips if p.divergence_margin is not None]
    deltas = [p.mean_abs_logprob_delta for p in prompts]
    return {
        "prompts": n,
        "identical_outputs": sum(p.identical for p in prompts),
        "identical_share": sum(p.identical for p in prompts) / n if n else math.nan,
        "mean_agreement": sum(p.agreement for p in prompts) / n if n else math.nan,
        "min_agreement": min((p.agreement for p in prompts), default=math.nan),
        "mean_abs_logprob_delta": sum(deltas) / n if n else math.nan,
        "p95_abs_logprob_delta": _quantile(deltas, 0.95),
        "max_abs_logprob_delta": max((p.max_abs_logprob_delta for p in prompts), default=math.nan),
        "diverged": len(flips),
        "diverged_at_near_tie": sum(m < NEAR_TIE_NATS for m in margins),
        "median_divergence_margin": _quantile(margins, 0.5) if margins else None,
    }


def compare(baseline: Sequence[Decoded], candidate: Sequence[Decoded]) -> tuple[list[PromptParity], dict[str, Any]]:
    if len(baseline) != len(candidate):
        raise ValueError(f"{len(baseline)} baseline outputs but {len(candidate)} candidate outputs")
    prompts = [compare_prompt(b, c) for b, c in zip(baseline, candidate)]
    return prompts, summarize(prompts)


def as_rows(prompts: Sequence[PromptParity]) -> list[dict[str, Any]]:
    return [asdict(p) for p in prompts]
