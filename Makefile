# dinolab: two commands for a fresh machine (Python 3.11 and make are all it needs).
#   make lab    install everything into .venv and open the series in JupyterLab
#   make test   install everything into .venv and run every test (unit, parity, notebooks under nbval)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The stored notebook outputs were made with these settings; CI and the tests use the same ones.
export OMP_NUM_THREADS := 2
export MKL_NUM_THREADS := 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TQDM_DISABLE := 1
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: lab test test-unit test-notebooks notebooks bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel the stored outputs were made with
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Options for JupyterLab, e.g. make lab LAB_ARGS="--port 8890 --no-browser". As root (Docker, CI machines)
# JupyterLab refuses to start without --allow-root, so it is added for root only.
LAB_ARGS ?=
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: install
	@echo "Starting JupyterLab on notebooks/; open the http://127.0.0.1:...?token=... URL it prints below."
	$(BIN)/jupyter lab notebooks/ $(ROOT_ARGS) $(LAB_ARGS)

test: install test-unit test-notebooks

test-unit: install
	$(BIN)/python -m pytest tests -q

NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout 600
test-notebooks: install
	$(BIN)/python tools/build_notebooks.py --check
	$(BIN)/python -m pytest $(NBVAL_FLAGS) -p no:cacheprovider -q notebooks/*.ipynb

# Regenerate the stored outputs (the only way they are ever made): make notebooks [NB="02 04"]
notebooks: install
	$(BIN)/python tools/build_notebooks.py $(NB)

bench: install
	$(BIN)/python tests/benchmarks/backbone_speed.py
	$(BIN)/python tests/benchmarks/msdeform_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
