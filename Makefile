# make demo: environment + tiny model + sample data + the batch job on an embedded local Ray (CPU).
# make test: the whole test suite (unit + integration on the real vLLM CPU engine, Ray and S3).
# make quantize-demo: the quantize environment + the tiny Gemma 3 quantized to FP8-dynamic, with its report.
VENV ?= .venv
PY := $(VENV)/bin/python
WORK ?= work
STAMP := $(VENV)/.setup-complete
# llm-compressor needs its own environment (it pins compressed-tensors apart from vLLM, docs/notes.md: Versions); the
# tests run jobs.quantize with this path's interpreter.
QVENV := .venv-quantize
QSTAMP := $(QVENV)/.setup-complete
# The tests' vLLM fault injector is its own test-only distribution (tests/fault_injection), installed into the
# environment for the tests only: vLLM loads plugins from installed entry points, and the production package
# registers none of ours for testing.
FSTAMP := $(VENV)/.test-faults-installed

.PHONY: env quantize-env test-deps test-plugins demo quantize-demo test unit integration clean

env: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_cpu_env.sh scripts/gemma3_no_torchvision_hook.py
	scripts/setup_cpu_env.sh $(VENV)

# The report test screenshots report.html with headless Chromium: a system package, not a Python one.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-deps:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

test-plugins: $(FSTAMP)

$(FSTAMP): tests/fault_injection/pyproject.toml | $(STAMP)
	$(PY) -m pip install -q --no-deps -e tests/fault_injection
	touch $@

quantize-env: $(QSTAMP)

$(QSTAMP): pyproject.toml scripts/setup_quantize_env.sh
	scripts/setup_quantize_env.sh $(QVENV)

$(WORK)/tiny-gemma3/config.json: pipeline/testing/tiny_gemma3.py | $(STAMP)
	$(PY) -m pipeline.testing.tiny_gemma3 $(WORK)/tiny-gemma3

$(WORK)/sample/records.parquet: | $(STAMP)
	$(PY) -m pipeline.testing.sample_data $(WORK)/sample

demo: $(STAMP) $(WORK)/tiny-gemma3/config.json $(WORK)/sample/records.parquet
	$(PY) -m jobs.caption --input $(WORK)/sample/records.parquet --output $(WORK)/demo-output \
		--config configs/tiny-cpu.yaml --model $(WORK)/tiny-gemma3 --overwrite \
		--set "fetch.local_path_prefixes=[$(WORK)/sample/images]"
	$(PY) -m jobs.show_output $(WORK)/demo-output --rows 6

quantize-demo: $(QSTAMP) $(WORK)/tiny-gemma3/config.json
	$(QVENV)/bin/python -m jobs.quantize --model $(WORK)/tiny-gemma3 --output $(WORK)/tiny-gemma3-fp8 --overwrite
	cat $(WORK)/tiny-gemma3-fp8/quantization_report.md

test: $(STAMP) $(QSTAMP) test-deps $(FSTAMP)
	$(PY) -m pytest -v --durations=15 tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) $(QSTAMP) test-deps $(FSTAMP)
	$(PY) -m pytest -v tests/integration

clean:
	rm -rf $(WORK) .pytest_cache
