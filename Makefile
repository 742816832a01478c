# The two commands a newcomer runs: `make book` builds the website, `make test` runs every test.
# While working: `make test-fast` (the unit tests without the slow ones, under 3 minutes on 2 cores), `make lint`.
PYTHON ?= python3
export PYTHONHASHSEED := 0

.PHONY: install browser book test test-fast lint notebooks student

install:
	$(PYTHON) -m pip install -q torch==2.13.0 || $(PYTHON) -m pip install -q "torch>=2.4,<2.15"
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

# headless Chromium for the site test (Debian's package; Playwright drives it, `playwright install` is never run)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

book: install
	jupyter-book build . -W -n --keep-going

NBVAL = --nbval --nbval-current-env --nbval-sanitize-with book/sanitize.cfg -p no:cacheprovider

test: install browser
	$(PYTHON) -m pytest tests
	$(PYTHON) -m pytest $(NBVAL) book

# tests marked @pytest.mark.slow (oracle runs, the site build, the browser, training) are left to `make test`
test-fast:
	$(PYTHON) -m pytest -m "not slow" tests

# ruff's rules and format live in pyproject.toml ([tool.ruff]); notebooks are linted, not formatted
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# re-execute every chapter the way its committed outputs must be made (CPU, fixed environment)
notebooks: install
	$(PYTHON) book/_tools/run_notebook.py --all

# the labs without their solutions, for students: _build/student/NN_*.ipynb and dsv3-book-student.zip
student:
	$(PYTHON) book/_tools/student.py
