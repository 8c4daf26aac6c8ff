# ClusterOS developer entry points. See README.md.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps build release image cluster down test test-host e2e check fmt bench

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

# Every test: unit and host cluster tests, then the VM end-to-end suite (in that order, also under -j).
test:
	$(MAKE) test-host
	$(MAKE) e2e

test-host:
	$(CARGO) test --workspace

# The VM end-to-end suites (tests/tests/*.rs, root; e2e.rs alone takes 3-5 minutes under TCG): build the agent and the image,
# boot VMs and check them from inside. A failed test leaves its logs in target/e2e-logs/<test>/.
E2E_ARGS ?=
# Then the image proofs: the raw image grows on a bigger disk, a diskless node PXE-boots and joins a
# cluster, and the packer site image builds and boots.
e2e: image
	$(CARGO) test -p clusteros-e2e --features e2e -- --test-threads=1 --nocapture $(E2E_ARGS)
	scripts/e2e-raw-resize
	scripts/e2e-pxe
	scripts/e2e-packer
	@echo "image proofs: 3 passed, 0 failed"

# Read-only check: format, clippy with warnings denied, host tests.
check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p clusteros-e2e --features e2e --all-targets -- -D warnings
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

bench:
	$(CARGO) bench -p clusteros-agent --bench cluster
