# HiStream Serve. `make run` and `make test` set everything up themselves (a .venv here).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
PROMPT ?= a red fox running through fresh snow at sunrise, cinematic

.PHONY: install run test lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls CUDA packages.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/histream generate --preset tiny --prompt "$(PROMPT)" \
		--out outputs/video.mp4 --report outputs/report.json
	@echo "video: $(CURDIR)/outputs/video.mp4 (report: $(CURDIR)/outputs/report.json)"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache *.egg-info
