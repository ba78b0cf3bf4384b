# Two entry points for newcomers (see README): `make demo` and `make test`.
# Both create or reuse the virtual environment in .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clipsearch-installed
DEMO_OUT ?= demo-out

.PHONY: demo test lint typecheck pytest install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "clipsearch needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,serve,onnx,ray,hybrid]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/clipsearch demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/python .ci/typecheck.py

# The browser tests drive Debian's Chromium (Playwright's own browser download does not
# work offline); install it once when missing (needs root, as on CI machines).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# pytest exits 5 when it collected no test: an empty selection must fail loudly.
pytest: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
