# splitrelay: every target works from a fresh clone; `setup` is idempotent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup test demo bench bench-smoke bench-audio lint fuzz clean

$(STAMP): scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	touch $@

setup:
	bash scripts/setup.sh
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/splitrelay demo

bench: $(STAMP)
	$(MAKE) -s -C bench
	$(VENV)/bin/splitrelay bench --markdown BENCHMARKS.md --plots docs/bench --results docs/bench/results.json \
		--analysis docs/bench/analysis.md

bench-smoke: $(STAMP)
	$(MAKE) -s -C bench
	$(VENV)/bin/splitrelay bench --smoke

bench-audio: $(STAMP)
	$(PY) -m splitrelay.bench.audio --duration $${AUDIO_SECONDS:-8}

fuzz: $(STAMP)
	SPLITRELAY_FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-50000} $(PY) -m pytest -q tests/test_xdp.py -k differential \
		--hypothesis-show-statistics

lint: $(STAMP)
	$(PY) -m ruff check splitrelay wire bpf edge transceiver client lab cli bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
