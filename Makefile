# logpipe entry points. `make demo` and `make test` are the two that matter on a fresh
# machine; everything else is a piece of them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CLUSTERS ?= ops
NODES ?= 5
export CLUSTERS NODES
CARGO ?= cargo
# The end-to-end targets of tests/ are built only with the `e2e` feature (see tests/Cargo.toml).
E2E := $(CARGO) test -p logpipe-e2e --features e2e --test

.PHONY: all build test unit lint fmt e2e e2e-testbed e2e-operator e2e-agent e2e-teams e2e-argocd e2e-argocd-health e2e-prometheus e2e-nodesim e2e-rollout e2e-examples \
        chart-test testbed-build testbed-addons testbed-up testbed-down testbed-wipe crds demo bench bench-operator \
        images images-test

all: build

build:
	$(CARGO) build --workspace --bins

## Test bed (see README "Test bed"): real control plane(s) and a real log store (VictoriaLogs) on loopback.
testbed-build:
	tests/testbed/build.sh etcd kube kwok victorialogs

testbed-up:
	tests/testbed/up.sh

testbed-down:
	tests/testbed/down.sh

# Add-ons beside a running test bed (tests/testbed/addons.sh): ADDONS="prometheus argocd".
ADDONS ?= prometheus argocd
testbed-addons:
	tests/testbed/addons.sh $(ADDONS)

testbed-wipe:
	tests/testbed/down.sh --wipe

## Tests, in two tiers (see README "Tests"):
## - unit: `cargo test --workspace`, hermetic (no test bed, no Go, no helm; only the processes
##   its tests start themselves), a few minutes;
## - e2e: the end-to-end tests on the local test bed (`--features e2e`), and the images.
test: lint unit e2e images-test

# Licences and bans (deny.toml), offline. cargo-deny is installed outside the repository
# (.ci/run does it): cargo install --locked cargo-deny --version 0.20.2 --root ~/.cache/logpipe/cargo-deny
# `cargo metadata` for the Linux targets only: the crates of other platforms are never
# downloaded, and cargo-deny's own `cargo metadata` would want them all.
CARGO_DENY ?= $(or $(shell command -v cargo-deny 2>/dev/null),$(HOME)/.cache/logpipe/cargo-deny/bin/cargo-deny)
DENY_TARGETS := x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu

# Clippy with the e2e feature, so the end-to-end targets are linted too (the feature only
# adds targets: everything else is the same code).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features logpipe-e2e/e2e -- -D warnings
	@[ -x "$(CARGO_DENY)" ] || { echo "make lint: cargo-deny not found at $(CARGO_DENY). Install it with" \
	  "'cargo install --locked cargo-deny --version 0.20.2 --root ~/.cache/logpipe/cargo-deny'" \
	  "(or put it on PATH, or set CARGO_DENY=/path/to/cargo-deny)" >&2; exit 1; }
	mkdir -p target
	$(CARGO) metadata --format-version 1 --offline --locked $(DENY_TARGETS:%=--filter-platform %) > target/deny-metadata.json
	$(CARGO_DENY) --offline --metadata-path target/deny-metadata.json check --hide-inclusion-graph licenses bans

fmt:
	$(CARGO) fmt --all

unit:
	$(CARGO) test --workspace

e2e: build e2e-testbed e2e-nodesim chart-test e2e-argocd-health e2e-examples e2e-operator e2e-agent e2e-teams e2e-prometheus e2e-argocd e2e-rollout

e2e-testbed: testbed-up
	$(E2E) e2e_testbed

e2e-operator: build testbed-up
	$(E2E) e2e_operator -- --test-threads 3

e2e-agent: build testbed-up
	$(E2E) e2e_agent
	$(E2E) e2e_agent_outage

# Selection, overlap-free partition and keyed limits: agents with pod discovery on the
# ops cluster (one bed, both tests well under a minute each).
e2e-teams: build testbed-up
	$(E2E) e2e_teams

# Phased rollouts with real agents on ROLLOUT_NODES nodes in each of ops, dev and prod
# (a running test bed with fewer nodes gets the missing ones added).
ROLLOUT_NODES ?= 20
e2e-rollout: build
	$(MAKE) testbed-up CLUSTERS="ops dev prod" NODES=$(ROLLOUT_NODES)
	NODES=$(ROLLOUT_NODES) $(E2E) e2e_rollout -- --nocapture --test-threads 1

e2e-nodesim: build testbed-up
	$(E2E) e2e_nodesim

e2e-argocd-health: testbed-up
	$(E2E) e2e_argocd_health

# A real Prometheus (built from its Go module) scrapes the agents through the scrape config
# the operator's ServiceMonitor renders to (README "Monitoring").
e2e-prometheus: build testbed-up
	tests/testbed/addons.sh prometheus
	$(E2E) e2e_prometheus -- --nocapture

# A real Argo CD (built from its Go module; Go 1.27, see README "Test bed") syncs
# LogPipelines from a local git repository to ops, dev and prod (README "GitOps").
e2e-argocd: build
	$(MAKE) testbed-up CLUSTERS="ops dev prod"
	tests/testbed/addons.sh argocd
	$(E2E) e2e_argocd -- --nocapture --test-threads 1

e2e-examples: testbed-up
	$(E2E) e2e_examples

chart-test: build testbed-up
	tests/testbed/build.sh helm
	$(E2E) e2e_chart

# The CRD is generated from the Rust types; the chart carries an identical copy.
crds:
	$(CARGO) run -q -p logpipe-operator -- crdgen > crds/logpipe.io_logpipelines.yaml
	cp crds/logpipe.io_logpipelines.yaml charts/logpipe/crds/
	UPDATE_REFERENCE=1 $(CARGO) test -q -p logpipe-e2e --test crd_reference --test metrics_reference

# DEMO=argocd make demo: the GitOps path instead, with a real Argo CD syncing a commit to
# ops, dev and prod by RollingSync (README "The GitOps alternative"); prints its timeline.
demo:
ifeq ($(DEMO),argocd)
	$(MAKE) build testbed-up CLUSTERS="ops dev prod"
	tests/testbed/addons.sh argocd
	$(E2E) e2e_argocd rolling_sync -- --nocapture --test-threads 1
else
	$(MAKE) testbed-up
	tests/testbed/demo.sh
endif

bench:
	$(CARGO) build --release -p logpipe-agent --bin logpipe-agent
	$(CARGO) build --release -p logpipe-bench --bin logpipe-bench
	tests/testbed/build.sh otelcol
	$(MAKE) testbed-up
	target/release/logpipe-bench --size "$${BENCH_SIZE:-default}"
	$(MAKE) bench-operator

# The operator's side (issue 7): a phased rollout on BENCH_NODES KWOK nodes (1000;
# BENCH_SIZE=small: 200) against a native DaemonSet RollingUpdate. Starts (or grows) the
# test bed to that many nodes; honours LOGPIPE_PORT_BASE / LOGPIPE_NET_OFFSET like it.
# Writes target/bench/operator.json and merges it into results.{json,md} when they exist.
# One cargo call over the workspace, as tests/testbed/up.sh builds the simulator: built
# apart, packages unify features differently and each rebuilds the other's dependencies.
BENCH_NODES ?= $(if $(filter small,$(BENCH_SIZE)),200,1000)
# A test bed of its own (directory, ports, addresses), stopped afterwards: nodes are never
# removed, and the end-to-end tests' bed must not grow to 1000 nodes.
BENCH_BED ?= LOGPIPE_TESTBED=$(CURDIR)/target/testbed-bench LOGPIPE_PORT_BASE=51000 LOGPIPE_NET_OFFSET=64
bench-operator:
	$(CARGO) build --release --workspace \
	  --bin logpipe-operator --bin logpipe-bench-operator --bin logpipe-nodesim
	$(BENCH_BED) LOGPIPE_NODESIM_PROFILE=release NODES=$(BENCH_NODES) tests/testbed/up.sh
	$(BENCH_BED) target/release/logpipe-bench-operator --nodes $(BENCH_NODES)
	$(BENCH_BED) tests/testbed/down.sh

## Container images without a Docker daemon (operator/Dockerfile and agent/Dockerfile are
## for machines with Docker): target/images/logpipe-{operator,agent}.tar, docker-archives
## for `docker load -i`. Needs root and buildah (apt-get install -y buildah).
images:
	tests/images/build.sh

# The images' content and the binaries running from their roots, then the Dockerfiles
# built offline with stand-in bases and compared with them.
images-test: images
	$(E2E) images
	tests/images/check-dockerfiles.sh
