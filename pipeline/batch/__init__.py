"""The batch job: one skeleton (`skeleton`) for both input formats (`caption`: parquet records, `openai_batch`:
OpenAI Batch files; `job` picks by input), and what a run keeps: `plan`, `resume`, `progress`,
`manifest`, `output_lease`, `metrics`.
"""
