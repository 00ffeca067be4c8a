"""A rendered chat prompt reaches the engine with one BOS: Ray's tokenize stage adds a second one
(the minimal case in pipeline.stages.rendered_prompts), ours does not."""
import asyncio

from ray.llm._internal.batch.stages.tokenize_stage import TokenizeStage, TokenizeUDF

from pipeline.stages.rendered_prompts import RenderedPromptTokenizeUDF, install

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture"}]}]


def _tokenize(udf_class, model, prompts):
    udf = udf_class(data_column="__data", expected_input_keys=["prompt"], model=str(model))

    async def collect():
        rows = [{udf.IDX_IN_BATCH_COLUMN: i, "prompt": p} for i, p in enumerate(prompts)]
        return [row async for row in udf.udf(rows)]

    return [row["tokenized_prompt"] for row in asyncio.run(collect())]


def test_one_bos_where_rays_stage_gives_two(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    bos = tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    canonical = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    canonical = list(canonical["input_ids"] if hasattr(canonical, "keys") else canonical)
    assert rendered.startswith(tokenizer.bos_token) and canonical[:2] == [bos, canonical[1]] and canonical[1] != bos

    # Upstream behaviour this module exists for: if this starts failing, Ray fixed it; drop the workaround.
    assert _tokenize(TokenizeUDF, tiny_model, [rendered])[0][:2] == [bos, bos]
    assert _tokenize(RenderedPromptTokenizeUDF, tiny_model, [rendered]) == [canonical]


def test_install_swaps_only_the_tokenize_stage():
    stage = TokenizeStage(fn_constructor_kwargs={"model": "m"}, map_batches_kwargs={})
    install(stage)
    assert stage.fn is RenderedPromptTokenizeUDF
