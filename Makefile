# Strake: build, lint, test bed and tests. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Toolchains as installed on this kind of machine (rustup in ~/.cargo, Go in /usr/local/go), found
# even when the caller's PATH lacks them (CI runs with a minimal environment).
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:$(PATH)
CARGO ?= cargo
# Integration suites each start real control planes; two at a time fit this machine size.
TEST_THREADS ?= 2

.PHONY: help demo build release lint fmt test unit-test integration-test critest bench testbed \
        testbed-packages testbed-upstream testbed-images testbed-env testbed-up testbed-prune clean-testbed-cache \
        conformance-bed conformance-binaries conformance-images conformance conformance-node-network \
        fuzz

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

demo: testbed ## Run a Strake node on a real control plane and serve a Deployment behind a Service
	$(CARGO) build --release --bins
	./target/release/strake-testbed demo $(DEMO_ARGS)

build: testbed-packages ## Build every crate (debug)
	$(CARGO) build --workspace --all-targets

release: testbed-packages ## Build the daemons (release)
	$(CARGO) build --workspace --release --bins

lint: testbed-packages ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

test: testbed conformance-bed testbed-prune lint ## Every test: lint, unit, component and integration tests (root; the multi-node ones need the conformance bed), then a check that nothing was left behind
	@rc=0; $(CARGO) test --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS) || rc=$$?; \
	bash integration/testbed/check-leftovers.sh || rc=1; exit $$rc

unit-test: testbed-packages ## Unit tests only (no root, no test bed)
	$(CARGO) test --workspace --lib --bins

integration-test: testbed ## Integration tests against the real test bed (root)
	$(CARGO) test -p strake-integration -- --test-threads=$(TEST_THREADS)

critest: testbed ## critest conformance (streaming included) against strake-runtime: minutes long
	$(CARGO) test -p strake-runtime --test cri_container critest_conformance -- --ignored --nocapture

fuzz: testbed-packages ## Every cargo-fuzz target for FUZZ_SECONDS (default 60) each, nightly; corpora in fuzz/corpus
	@bash fuzz/run.sh

bench: testbed ## Benchmarks side by side with the upstream peers (release builds); see docs/PERFORMANCE.md
	$(CARGO) build --release -p strake-runtime -p strake-proxy -p strake-kubelet -p strake-integration --bins
	./target/release/strake-bench runtime --pods 20
	./target/release/strake-bench proxy --services 1000,10000,30000 --endpoints 2,10
	./target/release/strake-bench kubelet --pods 30,100 --steady-secs 60

testbed: testbed-packages testbed-upstream testbed-images ## Install and build everything the tests need (idempotent)

testbed-packages: ## Debian packages (runc, nftables, docker-registry, protoc, containerd, ...)
	@bash integration/testbed/install-packages.sh

testbed-upstream: testbed-packages ## Upstream binaries from Go modules, cached in /var/cache/strake
	@bash integration/testbed/build-upstream.sh

testbed-images: testbed-packages ## Test images for the local registry, cached in /var/cache/strake
	@bash integration/testbed/build-images.sh

conformance-bed: conformance-binaries conformance-images ## Upstream's e2e.test, ginkgo, agnhost, CoreDNS and the conformance images (slow; cached)

conformance-binaries: testbed-upstream ## e2e.test, ginkgo, agnhost, sample-apiserver, CoreDNS from Go modules, cached
	@bash integration/testbed/build-conformance.sh

conformance-images: conformance-binaries ## The images the [Conformance] specs run, under their upstream names (mmdebstrap), cached
	@bash integration/testbed/build-conformance-images.sh

# Conformance runs: NODE_KIND=strake|upstream|swap-runtime|swap-kubelet|swap-proxy, NODES=<n>, CONFORMANCE_PROCS=<parallel ginkgo
# processes>, CONFORMANCE_FOCUS=<regex narrowing the selection>, REPORTS=<reports folder>,
# CONFORMANCE_PROFILE=release|dev (the cargo profile the Strake daemons are built with).
NODE_KIND ?= strake
NODES ?= 2
CONFORMANCE_PROCS ?= 4
CONFORMANCE_FOCUS ?=
REPORTS ?= reports/conformance-$(NODE_KIND)-$(NODES)-$(shell date +%Y%m%d-%H%M%S)
CONFORMANCE_PROFILE ?= release
CONFORMANCE_RUN = $(CARGO) build --profile $(CONFORMANCE_PROFILE) --bins && \
	./target/$(if $(filter dev,$(CONFORMANCE_PROFILE)),debug,$(CONFORMANCE_PROFILE))/strake-testbed conformance \
	--node-kind $(NODE_KIND) --nodes $(NODES) --procs $(CONFORMANCE_PROCS) --report-dir $(REPORTS) \
	$(if $(CONFORMANCE_FOCUS),--focus '$(CONFORMANCE_FOCUS)')

conformance: testbed conformance-bed ## Every [Conformance] spec of e2e.test on a NODES-node NODE_KIND cluster (hours)
	$(CONFORMANCE_RUN) --set all

conformance-node-network: testbed conformance-bed ## The [sig-node] and [sig-network] [Conformance] specs on a NODES-node NODE_KIND cluster
	$(CONFORMANCE_RUN) --set node-network

testbed-env: ## Print shell exports for the test bed: eval "$$(make -s testbed-env)"
	@bash integration/testbed/env.sh

testbed-up: testbed ## Run a control plane and registries until Ctrl-C
	$(CARGO) run -q -p strake-integration --bin strake-testbed -- up

testbed-prune: ## Drop from the cache what the pinned versions no longer use, and the bed's Go build cache
	@bash integration/testbed/prune-cache.sh

clean-testbed-cache: ## Remove the cached upstream binaries and images
	rm -rf "$${STRAKE_CACHE:-/var/cache/strake}"
