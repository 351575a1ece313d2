# splitrelay: every target works from a fresh clone; `setup` is idempotent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup test demo bench lint fuzz clean

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
	@echo "make bench: the benchmark suite is not built yet (issue: Benchmarks)"; exit 2

fuzz: $(STAMP)
	SPLITRELAY_FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-50000} $(PY) -m pytest -q tests/test_xdp.py -k differential \
		--hypothesis-show-statistics

lint: $(STAMP)
	$(PY) -m ruff check bpf edge transceiver cli tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
