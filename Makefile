# ClusterOS developer entry points. See README.md.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps build release image cluster down test test-host faults faults-short fuzz-smoke e2e e2e-suites e2e-containers e2e-vms check fmt bench bench-scale

all: build

deps:
	scripts/install-host-deps

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p clusteros-agent

image: deps release
	image/build

# The main job: build the image, boot a local 3-node cluster, print its status.
cluster: image
	scripts/run-cluster 3

down:
	qemu/cluster down

# Every test: unit and host cluster tests, the short fault suite, the fuzz smoke run, then the VM
# end-to-end suite (in that order, also under -j).
test:
	@rm -f target/tier-times
	scripts/tier host $(MAKE) test-host
	scripts/tier faults $(MAKE) faults-short
	scripts/tier fuzz $(MAKE) fuzz-smoke
	scripts/tier image $(MAKE) image
	scripts/tier containers $(MAKE) e2e-containers
	scripts/tier vm $(MAKE) e2e-vms
	@echo "test tiers:"; cat target/tier-times

# The host tests need root, iproute2 and tcpdump (deps installs them).
test-host: deps
	$(CARGO) test --workspace

# The fault-injection suite (root, nftables): release agents in network namespaces, 3- and 5-node
# clusters at once, clients on every node, FAULTS_ROUNDS rounds of every fault kind, histories
# checked for linearizability and lost writes; prints a report per cluster. Files of a failed run
# stay in target/faults/n3 and target/faults/n5. FAULTS_SEED, FAULTS_KINDS: see tests/src/faults/mod.rs.
FAULTS_ROUNDS ?= 20
faults: deps release
	FAULTS_ROUNDS=$(FAULTS_ROUNDS) $(CARGO) test --release -p clusteros-e2e --features faults --test faults -- --nocapture

# The bounded version that .ci/run runs: 2 rounds of every fault kind.
faults-short:
	$(MAKE) faults FAULTS_ROUNDS=2

# Every fuzz target (agent/fuzz: peer requests and auth headers, config and credentials,
# snapshots, apply, WireGuard dumps, the SLURM state copy, the TLS handshake) for FUZZ_SECONDS (default 30) from its
# committed seeds, on the stable toolchain (libFuzzer with cargo-fuzz's instrumentation and no
# sanitizer, built by cargo itself; optimized unless FUZZ_PROFILE=dev).
fuzz-smoke: deps
	scripts/fuzz-smoke

# The VM end-to-end suites (tests/tests/*.rs, root; 15-20 minutes under TCG): build the agent and the image,
# boot VMs and check them from inside: services.rs (one 3-node cluster: mesh, munge, SLURM,
# controller failover, a powered-off node's reboot and rejoin, the Raft leader's power-off),
# images.rs (a machine flashed with the raw image boots UEFI, grows its root and forms a cluster that
# a diskless node PXE-boots into; the packer site image builds and boots). A failed test leaves its logs in target/e2e-logs/<test>/
# (every test does with CLUSTEROS_E2E_SAVE_LOGS=1).
E2E_ARGS ?=
e2e: image
	$(MAKE) e2e-suites

# The VM suites on the image already built: the container tier, then the QEMU tier.
e2e-suites:
	$(MAKE) e2e-containers
	$(MAKE) e2e-vms

# The fast tier (tests/tests/containers.rs, about 25 s): the image's root booted as systemd-nspawn
# containers: formation, the agent under systemd, munge and slurmctld over D-Bus, a killed agent
# restarted by systemd, a node with a wrong secret refused, a node without a secret. What needs a kernel of its own stays in QEMU.
e2e-containers:
	$(CARGO) test -p clusteros-e2e --features e2e --test containers -- --test-threads=1 --nocapture $(E2E_ARGS)

e2e-vms:
	$(CARGO) test -p clusteros-e2e --features e2e --test services --test images -- --test-threads=1 --nocapture $(E2E_ARGS)

# Read-only check: format, clippy with warnings denied, host tests.
check:
	$(CARGO) fmt --all --check
	scripts/check-layers
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p clusteros-e2e --features e2e,faults --all-targets -- -D warnings
	cd agent/fuzz && $(CARGO) fmt --check && $(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

# Figures, not pass/fail: formation, idle RSS and failover (benches/cluster.rs), then KV puts/s
# side by side with etcd 3.4 from Debian (benches/kv.rs; etcd-server is installed when missing).
bench:
	command -v etcd >/dev/null || (apt-get update -q && apt-get install -y -q etcd-server etcd-client)
	$(CARGO) bench -p clusteros-agent --bench cluster --bench kv

# Figures at scale (benches/scale.rs): N agents on loopback with identical configs, for each N in
# SCALE_NODES: formation, idle CPU/RSS, the leader's bytes/s, failover, and a model at 1,000 and
# 5,000 nodes. 250 agents need about 6 GiB of memory.
SCALE_NODES ?= 50 100 250
bench-scale:
	SCALE_NODES="$(SCALE_NODES)" $(CARGO) bench -p clusteros-agent --bench scale
