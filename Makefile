# ClusterOS developer entry points. See README.md.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps build release image cluster down test test-host check fmt bench

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

# Every test: unit and host cluster tests, then the VM end-to-end suite.
test: test-host

test-host:
	$(CARGO) test --workspace

# Read-only check: format, clippy with warnings denied, host tests.
check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

bench:
	$(CARGO) bench -p clusteros-agent --bench cluster
