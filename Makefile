# HiStream Serve. `make run` and `make test` set everything up themselves (a .venv here).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# the embedded default preset (toy) draws the scenes of its training grammar (training/data.py)
PROMPT ?= a large red circle moving quickly left on a dark blue background
HTTP_PORT ?= 8000
GRPC_PORT ?= 9000

PROTOS := $(wildcard protos/histream/v1/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py)

.PHONY: install protos browser run test lint format bench train clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls CUDA packages.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# gRPC/protobuf stubs, generated next to their .proto (never committed).
protos/histream/v1/%_pb2.py: protos/histream/v1/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $<

protos: $(STUBS)

# Starts the service (local Ray + Serve), submits one prompt through the HTTP API, waits with a
# progress bar, writes the MP4 locally and stops the service.
run: $(STAMP) protos
	@mkdir -p outputs; $(VENV)/bin/histream serve --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		--storage outputs/storage > outputs/serve.log 2>&1 & server=$$!; \
	trap 'kill -INT $$server 2>/dev/null; wait $$server' EXIT; \
	$(VENV)/bin/histream submit --url http://127.0.0.1:$(HTTP_PORT) --wait-ready 180 \
		--prompt "$(PROMPT)" --out outputs/video.mp4 \
		|| { echo "--- outputs/serve.log ---"; tail -30 outputs/serve.log; exit 1; }

# Headless Chromium + ChromeDriver, and Firefox ESR with the FFmpeg library it decodes H.264
# with, for the web player's browser tests (Debian packages); where they cannot be installed (no
# root, no apt) the browser tests skip and say why.
browser:
	@{ command -v chromium && command -v chromedriver && command -v firefox-esr \
		&& ls /usr/lib/*/libavcodec.so.*; } >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		$$SUDO apt-get update -q && \
		AVCODEC=$$(apt-cache pkgnames libavcodec | grep -xE 'libavcodec[0-9]+' | sort -V | tail -1); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver \
			firefox-esr $$AVCODEC \
		|| echo "warning: could not install the browsers; browser tests will skip"; }

# Two pytest processes side by side: the tests that start Ray (marked `ray`, tests/conftest.py)
# one after another in one, every other test in the other (its output follows) at a lower CPU
# priority, since Ray's processes are timed (a Serve proxy must answer its health check within
# 5 s) and the other tests only need throughput. Line + branch coverage of histream_model and
# services, each kept above its floor (COVERAGE_FLOORS: package=percent, set at what the suite
# reaches; code run inside Ray's replicas is not counted).
COVERAGE_FLOORS ?= histream_model=93 services=91
test: $(STAMP) protos browser
	$(PY) -m ruff check .
	@mkdir -p outputs; rm -f .coverage .coverage.*
	@$(PY) -m compileall -q histream_model services protos training > /dev/null  # once, not per process
	@COVERAGE_FILE=.coverage.rest nice -n 10 $(PY) -m pytest -q -m "not ray" -p no:cacheprovider \
		--durations=10 --cov --cov-report= > outputs/test-without-ray.log 2>&1 & rest=$$!; \
	COVERAGE_FILE=.coverage.ray $(PY) -m pytest -q -m ray --durations=25 --cov --cov-report=; \
	ray=$$?; wait $$rest; without=$$?; \
	echo "--- the tests without Ray (run beside those above) ---"; cat outputs/test-without-ray.log; \
	[ $$ray = 0 ] && [ $$without = 0 ]
	@$(PY) -m coverage combine -q .coverage.rest .coverage.ray
	@$(PY) -m coverage report --skip-covered --sort=-cover | tail -18
	@for floor in $(COVERAGE_FLOORS); do \
		pkg=$${floor%%=*}; pct=$${floor##*=}; \
		total=$$($(PY) -m coverage report --include="$$pkg/*" --format=total --fail-under=$$pct); \
		rc=$$?; echo "coverage of $$pkg: $$total% (floor $$pct%)"; \
		[ $$rc = 0 ] || { echo "coverage of $$pkg is under its floor"; exit 1; }; \
	done

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Trains the toy preset's weights from scratch into histream_model/checkpoints/toy; TRAIN_ARGS
# passes options (python -m training --help). On 2 cores the defaults take about an hour; the
# shipped weights used the GPU recipe in their MODEL_CARD.md (README, "A model trained here").
train: $(STAMP)
	$(PY) -m training $(TRAIN_ARGS)

bench: $(STAMP) protos
	$(PY) -m bench

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache *.egg-info $(STUBS) $(STUBS:_pb2.py=_pb2_grpc.py) $(STUBS:.py=.pyi)
