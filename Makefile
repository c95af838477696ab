# Quick start on a fresh machine (Python 3.10+):
#   make demo   - set up .venv and run the whole loop on local folders (colabkit demo)
#   make test   - set up .venv and run the test suite (twice for the magics: Colab's IPython 7.34 and newest)
PYTHON ?= python3
VENV ?= .venv
COLAB_VENV ?= .venv-colab
PIP_FLAGS ?= -q --disable-pip-version-check
# torch first, pinned, so no resolver pulls a multi-GB CUDA build; numpy with it, as on Colab and every VM
# (torch warns "Failed to initialize NumPy" in every run without it)
TORCH ?= torch==2.13.0 numpy

.PHONY: setup demo test test-colab bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[test,browser]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/colabkit demo

# the Colab-pinned environment is built first: the browser tests serve the classic Notebook 6 from it
test: setup $(COLAB_VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider
	$(MAKE) test-colab

# The magics again under Colab's pinned front end: IPython 7.34, ipykernel 5.5.6, ipywidgets 7.7; and the classic
# Notebook 6 that the browser test serves the dashboard from (ipywidgets 7.7's front end)
$(COLAB_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	# one resolver call, so nothing the test extra pulls in can move the pins
	$(COLAB_VENV)/bin/pip install $(PIP_FLAGS) "ipython==7.34.0" "ipykernel==5.5.6" "ipywidgets==7.7.5" "notebook<7" \
		-e ".[test]"
	touch $@

test-colab: $(COLAB_VENV)/.installed
	$(COLAB_VENV)/bin/python -c "import IPython, ipywidgets; print('IPython', IPython.__version__, 'ipywidgets', ipywidgets.__version__)"
	$(COLAB_VENV)/bin/python -m pytest -q -p no:cacheprovider -m magic

bench: setup
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(COLAB_VENV) benchmarks/_work
