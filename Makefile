# zcells: `make run` starts a local demo tree with its live status, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= auto
DEV_DIR ?= $(CURDIR)/.zcells/dev

.PHONY: install run test test-postgres check lint typecheck bench bench-transport bench-updates \
	bench-builds bench-sim bench-scheduler sim clean

install: $(STAMP)

# Reinstall when the package metadata changes; the install is editable, so code
# edits need no reinstall.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Two compute cells under the API cell, one with a grandchild, 4 fake hosts each.
run: $(STAMP)
	$(BIN)/zcells dev --dir $(DEV_DIR) --children 2 --grandchildren 1 --hosts 4

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-postgres: $(STAMP)
	$(BIN)/python tests/tools/pgserver.py run -- \
		$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m postgres $(PYTEST_ARGS)

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the editable install's mapping of db/ and cli/ into zcells,
# so it checks a tree of links laid out the way the package installs.
TYPECHECK_TREE := build/typecheck
typecheck: $(STAMP)
	@rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/zcells
	@for f in zcells/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK_TREE)/zcells/; done
	@ln -s "$(CURDIR)/db" $(TYPECHECK_TREE)/zcells/db
	@ln -s "$(CURDIR)/cli" $(TYPECHECK_TREE)/zcells/cli
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p zcells

bench: bench-transport bench-updates bench-builds bench-sim bench-scheduler

bench-transport: $(STAMP)
	$(BIN)/python bench/transport.py

bench-updates: $(STAMP)
	$(BIN)/python bench/updates.py

bench-builds: $(STAMP)
	$(BIN)/python bench/builds.py

bench-sim: $(STAMP)
	$(BIN)/python bench/sim.py

bench-scheduler: $(STAMP)
	$(BIN)/python bench/scheduler.py

# The default simulation: 1,000 cells, 10 virtual minutes, every fault; SIM_ARGS to change it
# (for example SIM_ARGS="--seed 7 --cells 100").
sim: $(STAMP)
	$(BIN)/zcells sim $(SIM_ARGS)

# Minutes of faults on a tree of real cells in network namespaces, then the invariants
# (soak/run.py says which); SOAK_MINUTES=10 by default, SOAK_SEED to replay a run.
# Also the codec fuzzer at length.
SOAK_MINUTES ?= 10
.PHONY: soak
soak: $(STAMP)
	ZCELLS_FUZZ_CASES=500000 $(BIN)/python -m pytest -q -p no:randomly tests/unit/test_codec_fuzz.py
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python soak/run.py
	for seed in 101 102 103; do $(BIN)/zcells sim --seed $$seed || exit 1; done

.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m zcells.config_doc --update docs/operations.md

clean:
	rm -rf $(VENV) .zcells .pytest_cache .mypy_cache .ruff_cache build *.egg-info
