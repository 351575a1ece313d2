# splitrelay: every target works from a fresh clone; `setup` is idempotent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup test demo bench bench-smoke bench-audio bench-failover soak lint fuzz clean vm-deps vm-box vm-test vm-matrix vm-check

$(STAMP): scripts/setup.sh pyproject.toml client/node/package-lock.json
	bash scripts/setup.sh
	touch $@

setup:
	bash scripts/setup.sh
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=20 $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/splitrelay demo

bench: $(STAMP)
	$(MAKE) -s -C bench
	$(VENV)/bin/splitrelay bench --markdown BENCHMARKS.md --plots docs/bench --results docs/bench/results.json
	$(PY) -m splitrelay.bench.audio --section --into BENCHMARKS.md
	$(PY) -m splitrelay.bench.failover --section --into BENCHMARKS.md

bench-smoke: $(STAMP)
	$(MAKE) -s -C bench
	$(VENV)/bin/splitrelay bench --smoke

# issue 12's failover gap (3a relay death, 3b floating address), Chromium and aiortc: ~4 min at 5 runs, root
bench-failover: $(STAMP)
	$(PY) -m splitrelay.bench.failover --section --runs $${FAILOVER_RUNS:-5}

bench-audio: $(STAMP)
	$(PY) -m splitrelay.bench.audio --section --duration $${AUDIO_SECONDS:-8}

# issue 24's soak: call churn through the XDP relay, program reloads, agent restarts, one worker killed
# (bench/soak.py; intervals scale with SOAK_MINUTES); root; exit 1 on a dropped call, growth or a leak
soak: $(STAMP)
	$(PY) -m splitrelay.bench.soak --minutes $${SOAK_MINUTES:-60} --results docs/bench/soak-$${SOAK_MINUTES:-60}min.json \
		--plots docs/bench

# Any number of cases runs to the end: no per-test timeout, a progress line every 10 s, the count at the end.
fuzz: $(STAMP)
	SPLITRELAY_FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-50000} SPLITRELAY_FUZZ_PROGRESS=1 $(PY) -m pytest -q -s \
		-o timeout=0 -p no:cacheprovider tests/xdp/test_differential.py --hypothesis-show-statistics

# Kernel-level VMs (issue 14): Debian boxes built here from apt, Vagrant on libvirt/qemu.
VM_RELEASES ?= bookworm

vm-deps:
	bash scripts/vm-deps.sh

vm-box: vm-deps
	@for r in $(VM_RELEASES); do bash scripts/vm-box.sh $$r || exit $$?; done

vm-test: vm-box
	bash scripts/vm-test.sh $(VM_RELEASES)

vm-matrix: vm-box
	bash scripts/vm-matrix.sh $(VM_RELEASES)

# What .ci/run runs after `make test`: both stock kernels, boxes built or reused, a small fuzz
# count; one "skipped" line where no box can be had.
VM_CHECK_RELEASES ?= bookworm trixie
vm-check:
	VM_RELEASES="$(VM_CHECK_RELEASES)" bash scripts/vm-check.sh

lint: $(STAMP)
	$(PY) -m ruff check splitrelay wire bpf edge transceiver client lab cli bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
