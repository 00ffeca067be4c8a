"""Build a random-weight Gemma-3 checkpoint offline: tiny for tests, or the exact 12B shapes for benchmarks.

Real weights cannot be downloaded where tests run, so tests use a checkpoint that exercises the real
code paths: the Gemma 3 architecture with a SigLIP vision tower at 896 px and 256 image tokens (so
prompts have real token counts), Gemma's special tokens and chat template, and a small BPE tokenizer
trained here. `GEMMA3_12B` has Gemma-3-12b-it's exact shapes: throughput measured with it is faithful
when the generated length is fixed.

    python -m pipeline.testing.tiny_gemma3 OUT_DIR [--shape tiny|tiny-alt|12b] [--device cpu|cuda]
                                           [--layout google|transformers]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.checkpoint_layout import to_google_layout

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
_WORDS = ("the a an of to and in is it that for on with as was be by this are or from at image picture "
          "photo describe what color shape red green blue yellow black white cat dog car tree house sky sun "
          "water person people man woman child city street there here very small large big little many some "
          "one two three four five you I we they he she my your our their can will would could should please "
          "tell me about show see look find answer question yes no maybe true false json list name value text "
          "number count left right top bottom center background foreground function tool call weather "
          "location get search result user assistant model system hello world thanks good bad best first "
          "last next time day night").split()

# Gemma 3's chat template: the system prompt is folded into the first user turn, images are marked
# with <start_of_image>, which the processor expands to 256 soft tokens.
CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@dataclass(frozen=True)
class Gemma3Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    vocab_size: int | None  # None: the tokenizer's size rounded up to 64
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    sliding_pattern: int = 6  # every 6th layer attends globally
    full_rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1_000_000.0})
    max_position_embeddings: int = 4096


TINY = Gemma3Shape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32, sliding_window=64, vocab_size=None,
                   vision_hidden_size=64, vision_intermediate_size=128, vision_layers=1, vision_heads=2,
                   sliding_pattern=2)
# google/gemma-3-12b-it: 12,187,325,040 parameters.
GEMMA3_12B = Gemma3Shape(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=256, sliding_window=1024, vocab_size=262208,
                         vision_hidden_size=1152, vision_intermediate_size=4304, vision_layers=27, vision_heads=16,
                         full_rope={"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         max_position_embeddings=131072)
# Other tiny shapes than TINY's, so that no code can pass on TINY's numbers alone: three text layers
# (global attention on the third), wider heads, two vision layers, an odd intermediate size.
TINY_ALT = Gemma3Shape(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=3,
                       num_key_value_heads=3, head_dim=32, sliding_window=32, vocab_size=None,
                       vision_hidden_size=48, vision_intermediate_size=96, vision_layers=2, vision_heads=3,
                       sliding_pattern=3)
SHAPES = {"tiny": TINY, "tiny-alt": TINY_ALT, "12b": GEMMA3_12B}
LAYOUTS = ("google", "transformers")

IMAGE_SIZE_PX = 896
PATCH_SIZE_PX = 14
MM_TOKENS_PER_IMAGE = 256


def _train_tokenizer(vocab: int, seed: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(seed)

    def lines(count=20000):
        for _ in range(count):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 20)))
            text = words[0].upper() + words[1:] + rng.choice([".", "?", "!", ",", ":"])
            yield text + ("\n" * rng.randint(1, 4) if rng.random() < 0.3 else "")

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    # SentencePiece-like: spaces become U+2581, as in Gemma's tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(lines(), trainer=trainer)
    # vLLM's Gemma 3 processor looks up "\n", "\n\n", ... as literal vocabulary entries.
    tokenizer.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in (1, 2, 3, 4)])
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIAL_TOKENS])
    # As Gemma's tokenizer.json does: encoding text prepends <bos>. The chat template renders <bos> too, so
    # a rendered prompt must be tokenized without special tokens (HF's rule); this makes a second BOS visible.
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    return tokenizer


def build_gemma3(out_dir: str | os.PathLike, shape: Gemma3Shape = TINY, *, device: str = "cpu",
                 seed: int = 0, tokenizer_vocab: int = 3000, layout: str = "google",
                 max_shard_size: str = "5GB") -> Path:
    """Write a complete random-weight checkpoint (weights, config, tokenizer, processor) to `out_dir`.

    `layout`: "google" keeps SigLIP under `vision_tower.vision_model.*`, as the published checkpoints do;
    "transformers" leaves it where transformers 5's `save_pretrained` puts it (`vision_tower.*`), as any
    fine-tune saved today has it (pipeline.engine.checkpoint_layout).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, GenerationConfig,
                              PreTrainedTokenizerFast)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(tokenizer_vocab, seed),
        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
                              "eot_token": "<end_of_turn>"},
        add_bos_token=True, add_eos_token=False, padding_side="left", model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE_PX, "width": IMAGE_SIZE_PX}, do_resize=True, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_convert_rgb=True, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                image_seq_length=MM_TOKENS_PER_IMAGE)

    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    layer_types = ["full_attention" if (i + 1) % shape.sliding_pattern == 0 else "sliding_attention"
                   for i in range(shape.num_hidden_layers)]
    config = Gemma3Config(
        text_config=dict(
            vocab_size=shape.vocab_size or ((len(tokenizer) + 63) // 64) * 64,
            hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
            query_pre_attn_scalar=shape.head_dim, sliding_window=shape.sliding_window, layer_types=layer_types,
            max_position_embeddings=shape.max_position_embeddings, pad_token_id=ids["<pad>"],
            eos_token_id=eos, bos_token_id=ids["<bos>"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": dict(shape.full_rope)},
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=shape.vision_hidden_size,
            intermediate_size=shape.vision_intermediate_size, num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads, image_size=IMAGE_SIZE_PX, patch_size=PATCH_SIZE_PX,
            vision_use_head=False, layer_norm_eps=1e-6,
        ),
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
        torch_dtype="bfloat16",
    )
    config.eos_token_id = eos
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: the 12B in fp32 would need 49 GB
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    logger.info("built %s parameters in %.1fs", f"{sum(p.numel() for p in model.parameters()):,}",
                time.time() - started)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    del model
    if layout == "google":
        to_google_layout(out)
    GenerationConfig(bos_token_id=ids["<bos>"], eos_token_id=eos, pad_token_id=ids["<pad>"],
                     do_sample=False).save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    preprocessor = image_processor.to_dict()
    preprocessor.update(image_processor_type="Gemma3ImageProcessor", processor_class="Gemma3Processor")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": MM_TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"}, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    logger.info("wrote %s in %.1fs", out, time.time() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu", help="where weights are initialised (cuda is fast for 12b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="google",
                        help="SigLIP tensor names: Google's, or transformers 5's save_pretrained")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_gemma3(args.out, SHAPES[args.shape], device=args.device, seed=args.seed, layout=args.layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
