# facegate — the two commands a newcomer needs: `make run` and `make test`.
# Both create .venv on first use and install the pinned dependencies (constraints.txt).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two installs: `make run` needs only the service and the sandbox extra; `make test`/`lint`/
# `bench` add the dev tools (pytest, mypy, schemathesis, selenium, ...). Each has its stamp,
# so `make test` after `make run` installs just the rest.
RUN_EXTRAS := sandbox
DEV_EXTRAS := dev,sandbox
RUN_STAMP  := $(VENV)/.run-stamp
DEV_STAMP  := $(VENV)/.dev-stamp

define install
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
		{ echo "facegate needs Python >= 3.11; found: $$($(PYTHON) --version 2>&1). Set PYTHON=python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(1)]"
endef

.PHONY: help run test lint bench lock clean venv image-test

help:
	@echo "make run    start facegate on 127.0.0.1:8000 (sandbox simulator when no ailabapi key is set)"
	@echo "make test   run the whole test suite (real sockets, real Redis)"
	@echo "make lint   ruff, mypy --strict, hadolint, manifest validation"
	@echo "make bench  run the benchmarks and rewrite BENCHMARKS.md"
	@echo "make image-test  build the Dockerfile with buildah and smoke-test the image (root; ~1-2 min)"
	@echo "make lock   re-resolve dependencies into constraints.txt"

$(RUN_STAMP): pyproject.toml constraints.txt
	$(call install,$(RUN_EXTRAS))
	@touch $(RUN_STAMP)

# The dev install holds everything `make run` needs too: it refreshes both stamps.
$(DEV_STAMP): pyproject.toml constraints.txt
	$(call install,$(DEV_EXTRAS))
	@touch $(DEV_STAMP) $(RUN_STAMP)

venv: $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/facegate serve

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app tests deploy/observability/build.py
	$(BIN)/lint-imports --no-logo
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest -q tests/unit/test_deploy.py

# Opt-in (not part of `make test`: about a minute, two on the first run): builds the real
# Dockerfile with buildah on a locally made Debian base, runs it as its user, checks the layers.
# Needs root, buildah and debootstrap; skips with the reason otherwise. .ci/run runs it.
image-test: $(DEV_STAMP)
	FACEGATE_TEST_IMAGE=1 $(BIN)/python -m pytest -q tests/image

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade "pip>=24"
	.lock-venv/bin/python -m pip install --quiet ".[$(DEV_EXTRAS)]"
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^facegate' > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
