"""Parity: does a numerics-changing setting (fp8 KV cache, another dtype, a kernel) still say the same thing?

`run.run_parity` decodes the first records of an input greedily under a baseline and a candidate setting
and `compare` measures token agreement and logprob divergence between them (docs/parity.md). Entry point:
`python -m jobs.parity`.
"""
