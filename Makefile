# Set-up and the two entry points of the README. Everything installs from requirements.txt
# in one pip command (numpy must stay pinned for MXNet) plus Debian's graphviz for `dot` and g++
# for qgraph's fused operators (qgraph/native.py builds them on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	command -v dot >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq graphviz)
	command -v g++ >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt -e .
	touch $@

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest
