# dinolab: two commands for a fresh machine (Python 3.11 and make are all it needs).
#   make lab    install everything into .venv and open the series in JupyterLab
#   make test   install everything into .venv and run every test (unit, parity, notebooks under nbval; the
#               browser checks of the slides and of JupyterLab when /usr/bin/chromium exists)
#   make slides one offline reveal.js deck per notebook in slides/ (needs npm)
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

.PHONY: lab test test-unit test-notebooks test-browser notebooks slides check-figures bench install clean

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

test: install test-unit test-notebooks test-browser

test-unit: install
	$(BIN)/python -m pytest tests -q

NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout 600
test-notebooks: install
	$(BIN)/python tools/build_notebooks.py --check
	$(BIN)/python -m pytest $(NBVAL_FLAGS) -p no:cacheprovider -q notebooks/*.ipynb

# Browser checks (tools/check_slides.py, tools/check_lab.py): they drive Debian's Chromium and install no
# browser; without /usr/bin/chromium they are skipped with a message (sudo apt-get install chromium chromium-driver).
CHROMIUM ?= /usr/bin/chromium
test-browser: install
	@if [ -x "$(CHROMIUM)" ]; then \
		$(MAKE) --no-print-directory slides && \
		CHROMIUM=$(CHROMIUM) $(BIN)/python tools/check_slides.py && \
		CHROMIUM=$(CHROMIUM) $(BIN)/python tools/check_lab.py; \
	else \
		echo "test-browser: skipped, $(CHROMIUM) not found (sudo apt-get install chromium chromium-driver)"; \
	fi

# Slides: one reveal.js deck per stored notebook with a presenter path, made from the stored outputs (nothing is
# re-executed): make slides [NB="00 02"]. reveal.js, MathJax 2, require.js and jQuery come from npm into
# slides/node_modules, so the decks work offline (open slides/NN_topic.slides.html in a browser).
SLIDES_NPM := reveal.js@4.0.2 mathjax@2.7.7 requirejs@2.3.8 jquery@2.2.4
SLIDES_VENDOR := slides/node_modules/.dinolab-installed
$(SLIDES_VENDOR):
	@command -v npm >/dev/null 2>&1 || { echo "error: npm not found (sudo apt-get install npm)"; exit 1; }
	mkdir -p slides
	npm install --prefix slides --no-save --no-package-lock --no-audit --no-fund --silent $(SLIDES_NPM)
	touch $@

slides: install $(SLIDES_VENDOR)
	$(BIN)/python tools/build_notebooks.py --slides $(NB)

# Figures a projector can show: PNG dpi and width, notebook size, font sizes in the code (tools/check_figures.py)
check-figures: install
	$(BIN)/python tools/check_figures.py $(NB)

# Regenerate the stored outputs (the only way they are ever made): make notebooks [NB="02 04"]
notebooks: install
	$(BIN)/python tools/build_notebooks.py $(NB)

bench: install
	$(BIN)/python tests/benchmarks/backbone_speed.py
	$(BIN)/python tests/benchmarks/msdeform_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
