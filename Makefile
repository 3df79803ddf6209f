# vhost-iotlb: `make run` builds and starts the daemon with its demo;
# `make test` installs what is missing, builds and runs every test.
SWIFT      ?= swift
LISTEN     ?= 127.0.0.1:8080
APT_PKGS   := libmicrohttpd-dev libjansson-dev pkg-config
PYTHON     ?= python3

.PHONY: all deps tools build release run test test-swift test-readme test-examples test-dpdk test-charts test-tsan test-asan bench charts charts-deps clean

all: build

# Installs the Debian packages only when pkg-config cannot find the libraries.
deps:
	@if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libmicrohttpd jansson; then :; else \
	  echo "installing $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

# What the example and operator tests use: promtool (Debian's prometheus),
# wrk (Debian), openapi-spec-validator and schemathesis (PyPI), dpdk-testpmd with
# its virtio-user and pcap drivers (Debian's dpdk-dev); installed only when missing.
tools:
	@command -v dpdk-testpmd >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq dpdk-dev; }
	@command -v promtool >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@$(PYTHON) -c 'import openapi_spec_validator, yaml' 2>/dev/null || \
	  $(PYTHON) -m pip install -q openapi-spec-validator pyyaml
	@command -v st >/dev/null 2>&1 || $(PYTHON) -m pip install -q schemathesis
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

run: release
	.build/release/iotlbd --listen $(LISTEN) --demo

test: test-swift test-readme test-examples test-dpdk test-charts

test-swift: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test

# Runs the README's curl walk-through against a live daemon and compares every answer.
test-readme: build
	$(PYTHON) tests/readme_walkthrough.py .build/debug/iotlbd README.md

# Runs every example against a live daemon; promtool, OpenAPI validation, SIGTERM.
test-examples: build tools
	$(PYTHON) tests/test_examples.py

# DPDK's virtio-user driver (dpdk-testpmd) through a vhost-user device, IOTLB off
# and on; needs root for huge pages, skips with a message where they cannot be had.
test-dpdk: build tools
	$(PYTHON) tests/test_vhost_user_dpdk.py

# The plotting script on the committed bench/results/*.json, and a tiny
# `iotlb-bench lookup --json` run; fails (does not skip) when it cannot run.
test-charts: build charts-deps
	$(PYTHON) tests/test_charts.py

# The Swift test suite under ThreadSanitizer / AddressSanitizer (own build folders).
test-tsan: deps
	$(SWIFT) test --sanitize=thread --scratch-path .build-tsan

test-asan: deps
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp $(SWIFT) test --sanitize=address --scratch-path .build-asan

# The benchmark tables of BENCHMARKS.md (release build; minutes, not for CI).
bench: release
	.build/release/iotlb-bench lookup
	.build/release/iotlb-bench control
	.build/release/iotlb-bench datapath --repeats 5

# matplotlib for $(PYTHON), installed only when missing: PyPI, else Debian's package.
charts-deps:
	@$(PYTHON) -c 'import matplotlib' 2>/dev/null || $(PYTHON) -m pip install -q matplotlib || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib; }
	@$(PYTHON) -c 'import matplotlib' || { echo "matplotlib is still missing for $(PYTHON)" >&2; exit 1; }

# The PNGs of bench/charts/ from the JSON reports in bench/results/ (BENCHMARKS.md, "Charts").
charts: charts-deps
	$(PYTHON) scripts/plot_benchmarks.py

clean:
	rm -rf .build
