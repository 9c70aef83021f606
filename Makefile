# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel: a bare `pip install torch` may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Benchmark anchors whose metadata pins numpy<2 though they run on numpy 2: installed without their deps.
ANCHORS_NODEPS := mpc==0.0.6 qpth==0.0.18

.PHONY: demo test lint install docs bench clean fuzz gfortran dist

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all,dev,docs]"
	$(BIN)/pip install -q --no-deps $(ANCHORS_NODEPS)
	touch $(STAMP)

install: $(STAMP) gfortran

demo: $(STAMP)
	$(BIN)/blackbox-diff demo

# lint-imports: the architecture contracts of pyproject.toml's [tool.importlinter] (layers, private modules,
# independent plugins, no cycles).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(STAMP) gfortran
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/blackbox-diff bench

# The sdist and the wheel (pip install dist/blackbox_diff-*.whl), checked as PyPI would check them.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# gfortran builds the Fortran legacy program of the tests and of examples/legacy_executable.py. Installed from
# the distribution's packages when missing (Debian/Ubuntu, as root); elsewhere a note, and those tests skip.
gfortran:
	@command -v gfortran >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q gfortran || { apt-get update -q && apt-get install -y -q gfortran; }; \
	  else echo "note: no gfortran, and no root/apt-get to install it: the Fortran tests will skip"; fi; }

# The fuzz suites at scale: >= 10,000 generated cases (tests/fuzzing.py's "fuzz" profile; CI runs the small
# "ci" profile with the rest of the tests). Prints hypothesis' statistics and the total of cases run.
FUZZ_TESTS := tests/test_fuzz.py tests/test_executable_fuzz.py tests/test_textio.py
fuzz: $(STAMP) gfortran
	@BBD_FUZZ_PROFILE=fuzz $(BIN)/python -m pytest -n 2 --dist loadfile -q --hypothesis-show-statistics \
	  $(FUZZ_TESTS) > $(VENV)/fuzz.log 2>&1; status=$$?; cat $(VENV)/fuzz.log; \
	  awk '/during generate phase/ {g = 1} /during (reuse|explicit|target|shrink) phase/ {g = 0} \
	    g && / passing, / {n += $$2} END {print "generated cases run (generate phase):", n; if (n < 10000) exit 1}' \
	    $(VENV)/fuzz.log \
	  && exit $$status

clean:
	rm -rf $(VENV) build dist site *.egg-info
