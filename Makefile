# The two commands of the README:  `make demo`  and  `make test`.
# Both set up .venv first (idempotent; a no-op when pyproject.toml has not changed).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omnivox-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup system-deps demo generate-demo test lint typecheck unit bench-decode clean

setup: $(STAMP)

# torch==2.13.0 first (the CPU wheel; any other torch request pulls a multi-GB CUDA build),
# openai-whisper without its deps (triton is 1 GB and unused on CPU), then our deps from
# pyproject.toml minus openai-whisper, then the project itself without the resolver.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps openai-whisper
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	deps = [d for d in p['dependencies'] + p['optional-dependencies']['test'] if not d.startswith('openai-whisper')]; \
	open('$(VENV)/requirements.txt', 'w').write('\n'.join(deps) + '\n')"
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/omnivox serve --host 127.0.0.1 --port 8000

generate-demo: setup
	$(VENV)/bin/omnivox generate --task a1a2 --input-wav tests/fixtures/question.wav \
		--output-wav out/demo_answer.wav --tokens-json out/demo_answer.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# Debian packages the browser tests need (chromium + chromium-driver; nodejs + npm bundle OpenAI's
# browser SDK for tests/test_webrtc_browser.py); installed when missing and apt-get is usable.
system-deps:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "note:$$missing missing and apt-get unavailable: the browser tests will be skipped"; fi; \
	fi

unit: setup system-deps
	$(PY) -m pytest

test: lint typecheck unit

bench-decode: setup
	$(VENV)/bin/omnivox bench decode --size tiny --batch 2 --json out/bench_decode_tiny.json

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
