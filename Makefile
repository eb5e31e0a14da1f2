# Fresh machine:  make demo  (set up + extract on the bundled images)   |   make test  (set up + tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch + torchvision builds known to work together (see README, "Installing")
ifeq ($(shell uname -m),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo test lint typecheck bench clean browser

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: install
	BIN=$(BIN) bash examples/demo.sh

lint: install
	$(BIN)/ruff check .

# The type checker over the package (config: pyproject.toml [tool.mypy]).
typecheck: install
	$(BIN)/mypy layertap

# The report test opens the HTML in a real headless browser: install Chromium where we can (root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/test_report.py's browser test is skipped"

test: install lint typecheck browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache
