"""Tokenize chat-template output without adding special tokens again (one BOS, not two).

Ray 2.60's tokenize stage (`ray.llm._internal.batch.stages.tokenize_stage.TokenizeUDF`) encodes the
rendered prompt with `tokenizer(prompts)`, which adds the tokenizer's special tokens. Gemma 3's chat
template already starts with `<bos>` and its tokenizer prepends another, so every prompt reached the
engine as [<bos>, <bos>, <start_of_turn>, ...]: a sequence the model never saw in training. Hugging
Face's rule (and vLLM's own chat path) is that a rendered prompt is tokenized with
`add_special_tokens=False`. The minimal case, with any Gemma tokenizer (the tiny test model's too):

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokenizer(prompt)["input_ids"][:2] == [bos, bos]

`RenderedPromptTokenizeUDF` is Ray's stage with that one argument changed; `install` swaps it in
through the processor's `override_stage_config_fn`. Remove both when Ray's stage does the same.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from ray.llm._internal.batch.stages.base import StatefulStage
from ray.llm._internal.batch.stages.tokenize_stage import TokenizeStage, TokenizeUDF

from pipeline.stages.patch import replace_stage_udf


def encode_rendered(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts a chat template rendered: its special tokens are already in the text."""
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


class RenderedPromptTokenizeUDF(TokenizeUDF):
    """Ray's tokenize stage, encoding the rendered prompt without a second set of special tokens."""

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        for row, prompt_token_ids in zip(batch, encode_rendered(self.tokenizer, [row["prompt"] for row in batch])):
            yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "tokenized_prompt": prompt_token_ids}


def install(stage: StatefulStage) -> None:
    """For an `override_stage_config_fn`: swap the tokenize stage's UDF (other stages are left alone)."""
    if isinstance(stage, TokenizeStage):
        replace_stage_udf(stage, RenderedPromptTokenizeUDF)
