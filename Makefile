# The README's two commands are `make demo` and `make test`; the rest are conveniences.
VENV := .venv/bin
.DEFAULT_GOAL := help

.PHONY: help venv setup demo test lint up down status evaluate chaos soak

help:
	@echo "make demo   - install everything, start Kafka, QuestDB and Mosquitto, run the demo"
	@echo "make test   - install everything, then lint, type-check and run all tests"
	@echo "make up | down | status - manage the local services"
	@echo "make evaluate - detection quality of the default detector on NAB, SKAB and the simulator (no services)"
	@echo "make chaos  - every fault and security recipe (16-25 min), then the chaos table"
	@echo "make soak   - the whole pipeline for 60 min at half the measured maximum, on its own stack; report in .twinflow/soak"

venv:
	@bash infra/bootstrap.sh

setup: venv
	@$(VENV)/twinflow setup

demo: setup
	@$(VENV)/twinflow demo

lint: venv
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/lint-imports

# pytest exits 5 when it collected no test: that is a failure here, said out loud.
test: setup lint
	@$(VENV)/pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing" >&2; exit 1; fi; exit $$rc

up: setup
	@$(VENV)/twinflow up

down: venv
	@$(VENV)/twinflow down

status: venv
	@$(VENV)/twinflow status

# -m chaos also selects the long (soak) recipes that the default run leaves out.
chaos: setup
	@$(VENV)/pytest -m chaos tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing" >&2; exit 1; fi; exit $$rc

evaluate: venv
	@$(VENV)/python -m benchmarks.evaluate

# Not part of `make test` or CI: an hour on its own Kafka, QuestDB and Mosquitto.
soak: setup
	@$(VENV)/python -m benchmarks.soak --minutes 60
