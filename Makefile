# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
# Both bootstrap .venv idempotently (re-installing only when pyproject.toml changes).

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-extras-stamp
WORLD   ?= worlds/small
ROWS    ?= datasets/small
export LIFELONG_QUIET ?=

.PHONY: venv quickstart lint test test-slow clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,gpu]'
	@touch $(STAMP)

venv: $(STAMP)

# The heavy peers whose tests run in CI but that the quickstart does not need: Ray, FuxiCTR, and TorchRec
# without its dependencies (they would pull the CUDA fbgemm; the `torchrec` extra brings the CPU one).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,gpu,torchrec,distributed,peers]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps torchrec==1.8.0
	@touch $(TEST_STAMP)

# The main loop: simulate -> inspect -> build rows -> train three rankers -> compare.
quickstart: venv
	$(VENV)/bin/lifelong simulate --preset small --out $(WORLD)
	$(VENV)/bin/lifelong inspect $(WORLD)
	$(VENV)/bin/lifelong transact build --data $(WORLD) --out $(ROWS) --neg-rate 0.15
	$(VENV)/bin/lifelong transact experiment quickstart --data $(ROWS) --seeds 1 --epochs 2 --out reports/quickstart

# The layers (import-linter contracts in pyproject.toml) and ruff's lint + import order.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts conftest.py
	$(VENV)/bin/lint-imports

# Default run: lint, then everything but tests marked slow. Tests marked realdata run when ../shared/data exists.
test: $(TEST_STAMP) lint
	$(VENV)/bin/pytest -n 2 -m "not slow"

test-slow: $(TEST_STAMP)
	$(VENV)/bin/pytest -n 2 -m slow

clean:
	rm -rf worlds datasets reports .pytest_cache .hypothesis
