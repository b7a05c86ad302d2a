# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
SCENE ?= sample_scenes/blob

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml .ci/install.sh
	bash .ci/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/recon run $(SCENE)

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python bench/run_bench.py

clean:
	rm -rf $(VENV) sample_scenes/*/recon
