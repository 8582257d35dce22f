# Two entry points: `make run` (set up, then run Shoebox) and `make test` (set up, then test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shoebox-installed

.PHONY: run demo bot test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

## run: the Discord bot when DISCORD_TOKEN is set (environment or .env), otherwise the offline demo
run: $(STAMP)
	@if [ -n "$${DISCORD_TOKEN:-}" ] || grep -qs '^DISCORD_TOKEN=..*' .env; then \
		$(BIN)/shoebox bot; \
	else \
		echo "DISCORD_TOKEN is not set: running the offline demo (see README to run the bot)."; \
		$(BIN)/shoebox demo; \
	fi

demo: $(STAMP)
	$(BIN)/shoebox demo

bot: $(STAMP)
	$(BIN)/shoebox bot

## test: the whole suite, offline, on the small model shipped in store/tinyclip
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

## bench: every benchmark under bench/, each printing its figures
bench: $(STAMP)
	@for script in bench/bench_*.py; do echo "== $$script"; HF_HUB_OFFLINE=1 $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) shoebox-demo .pytest_cache
