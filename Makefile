# Two commands matter: `make up` (run the whole network locally) and `make test`.
# Everything they need is installed by `make setup`, which is idempotent and fast when done.

PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
APT_PKGS := clang-19 llvm-19 postgresql

.PHONY: setup up test program bench clean-local apt

setup: apt $(STAMP)

# Debian packages: the C compiler for the on-chain program (the build test rebuilds it) and
# PostgreSQL (the ledger is tested on SQLite and on a throwaway PostgreSQL server).
apt:
	@dpkg -s $(APT_PKGS) >/dev/null 2>&1 || { \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); }

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	@touch $(STAMP)

up: setup
	$(PY) scripts/devnet.py

test: setup
	$(PY) -m pytest -q

program: apt
	$(PY) programs/registry/build.py

bench: setup
	$(PY) bench/registry.py

clean-local:
	rm -rf .local
