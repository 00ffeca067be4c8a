"""`import pipeline` (and building a config) must not drag in torch, vLLM or Ray's LLM stack: the
driver of a batch job and the tests of pure logic stay light, as Ray's own lazy-import test checks."""
import subprocess
import sys

HEAVY = ["torch", "vllm", "transformers", "ray.data.llm", "ray.serve.llm", "llmcompressor", "matplotlib"]


def test_facade_import_is_light():
    code = ("import sys, pipeline; from pipeline import PipelineConfig; PipelineConfig.load(environ={}); "
            "import pipeline.batch.caption, pipeline.stages.prepare, pipeline.stages.engine_rows, pipeline.batch.resume, pipeline.stages.crash_isolation; "
            "import pipeline.batch.progress, pipeline.batch.metrics, pipeline.report.build, pipeline.report.html, pipeline.batch.plan, jobs.report; "
            "import pipeline.serve.app, pipeline.serve.guard, pipeline.serve.errors, pipeline.serve.http, jobs.serve; "
            "import pipeline.tools, pipeline.tools.chain, pipeline.tools.builtins; "
            "import pipeline.ops.ledger, pipeline.ops.schedule, pipeline.ops.submit, jobs.schedule, jobs.submit; "
            "import pipeline.batch.job, pipeline.openai.batch_requests, pipeline.openai.batch_output, "
            "pipeline.stages.openai_batch, pipeline.batch.openai_batch, pipeline.batch.openai_batch_sink; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
