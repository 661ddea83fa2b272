# The two commands of the README:
#   make study   set up everything, obtain the data, run the bundled seed study
#   make test    set up everything the tests need, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
# The suite's processes (pytest-xdist; a test file stays in one of them, with its fixtures; 0
# runs it in make's own pytest process). Its tests are mostly single-threaded Python (figures,
# the store, starting commands): two take 40% less time than one on two cores.
TEST_PROCESSES ?= 2

.PHONY: study quick test data system-deps lint clean

study: $(VENV)/.installed data
	$(BIN)/fashionlab study $(ARGS)

quick: $(VENV)/.installed data
	$(BIN)/fashionlab study --quick $(ARGS)

test: $(VENV)/.installed-test system-deps
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(ARGS)

data: $(VENV)/.installed
	bash scripts/system-deps.sh dataset
	$(BIN)/fashionlab data fetch

system-deps:
	bash scripts/system-deps.sh all

# The study needs the package alone; the tests add their extras (PostgreSQL's driver, ONNX,
# MLflow, TensorBoard, Jupyter's, a browser driver: 0.6 GB more) to the same environment.
# constraints.txt pins what CI tests, with Python 3.11's builds (numpy 2.4 has none for 3.10).
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: \
	$(PYTHON) is older than Python 3.11, which the pinned versions need: make PYTHON=python3.11 \
	(or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

lint:
	$(BIN)/python -m ruff check fashionlab tests benchmarks

clean:
	rm -rf $(VENV) fashionlab-runs
