# make demo: environment + tiny model + sample data + the batch job on an embedded local Ray (CPU).
# make test: the whole test suite (unit + integration on the real vLLM CPU engine, Ray and S3).
VENV ?= .venv
PY := $(VENV)/bin/python
WORK ?= work
STAMP := $(VENV)/.setup-complete

.PHONY: env demo test unit integration clean

env: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_cpu_env.sh scripts/gemma3_no_torchvision_hook.py
	scripts/setup_cpu_env.sh $(VENV)

$(WORK)/tiny-gemma3/config.json: | $(STAMP)
	$(PY) -m pipeline.testing.tiny_gemma3 $(WORK)/tiny-gemma3

$(WORK)/sample/records.parquet: | $(STAMP)
	$(PY) -m pipeline.testing.sample_data $(WORK)/sample

demo: $(STAMP) $(WORK)/tiny-gemma3/config.json $(WORK)/sample/records.parquet
	$(PY) -m jobs.caption --input $(WORK)/sample/records.parquet --output $(WORK)/demo-output \
		--config configs/tiny-cpu.yaml --model $(WORK)/tiny-gemma3 --overwrite
	$(PY) -m jobs.show_output $(WORK)/demo-output --rows 6

test: $(STAMP)
	$(PY) -m pytest -v --durations=15 tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -v tests/integration

clean:
	rm -rf $(WORK) .pytest_cache
