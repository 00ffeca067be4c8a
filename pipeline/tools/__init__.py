"""Tool calling for Gemma 3, in batch and online.

Modules: `parser` (find, read and check the pythonic calls in a model turn), `request` (a record's or
request's tools and tool choice; forced calls as vLLM forces them), `registry` and `builtins` (the tools
the pipeline runs: exact arithmetic, table lookup, image metadata), `chain` (the rounds of one record) and
`template` (the packaged Gemma 3 tool chat template). What plugs them into Ray and vLLM lives outside this
package, so it needs neither: `pipeline.stages.tools` (the batch processor's tool UDFs) and
`pipeline.engine.tool_parser` (the `gemma3` vLLM tool parser for the endpoint, registered by
`pipeline.engine.plugin`).
"""
