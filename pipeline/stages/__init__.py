"""Everything that adapts Ray Data / `ray.data.llm` stages, in one place: preparing rows (`prepare`), engine
requests and outputs (`engine_rows`), the crash-isolating engine UDF (`crash_isolation`, `guarded`),
tool rounds (`tools`), rendered prompts, the stage patch, and the OpenAI Batch stages.
"""
