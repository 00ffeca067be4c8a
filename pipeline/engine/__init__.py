"""The engine: config -> vLLM arguments (`args`), the checkpoint (`checkpoint`, `checkpoint_layout`),
the one vLLM plugin entry (`plugin`) and what it registers: the Gemma 3 variant with uint8 images
(`gemma3`), our one vLLM patch (`patches`), the `gemma3` tool parser (`tool_parser`); engine start-up
diagnostics (`start`, `shm_tracker`, `stack_sampler`).

vLLM imports `pipeline.engine.plugin` in every process it starts: keep this file empty.
"""
