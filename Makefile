# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
SCENE ?= sample_scenes/blob

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/recon run $(SCENE)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q

# The inner loop: everything but the end-to-end runs (SfM, full pipeline).
test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench: install
	$(VENV)/bin/python bench/run_bench.py

clean:
	rm -rf $(VENV) sample_scenes/*/recon
