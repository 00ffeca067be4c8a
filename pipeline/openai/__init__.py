"""OpenAI protocol shapes shared by the endpoint and OpenAI Batch: request lines and their checks
(`batch_requests`), output and error lines (`batch_output`, `batch_written`). No Ray, no vLLM.
"""
