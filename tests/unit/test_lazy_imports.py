"""`import pipeline` (and building a config) must not drag in torch, vLLM or Ray's LLM stack: the
driver of a batch job and the tests of pure logic stay light, as Ray's own lazy-import test checks."""
import subprocess
import sys

HEAVY = ["torch", "vllm", "transformers", "ray.data.llm", "ray.serve.llm", "llmcompressor", "matplotlib"]


def test_facade_import_is_light():
    code = ("import sys, pipeline; from pipeline import PipelineConfig; PipelineConfig.load(environ={}); "
            "import pipeline.batch, pipeline.prepare, pipeline.engine_rows, pipeline.resume, pipeline.faults; "
            "import pipeline.progress, pipeline.metrics, pipeline.report, pipeline.report_html, pipeline.plan, jobs.report; "
            "import pipeline.serve, pipeline.serve_guard, pipeline.serve_errors, pipeline.serve_http, jobs.serve; "
            "import pipeline.tools, pipeline.tools.chain, pipeline.tools.builtins; "
            "import pipeline.ledger, pipeline.schedule, pipeline.submit, jobs.schedule, jobs.submit; "
            "import pipeline.batch_job, pipeline.openai_batch, pipeline.openai_batch_output, "
            "pipeline.openai_batch_stages, pipeline.openai_batch_run, pipeline.openai_batch_sink; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
