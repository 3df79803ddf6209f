# vhost-iotlb: `make run` builds and starts the daemon with its demo;
# `make test` installs what is missing, builds and runs every test.
SWIFT      ?= swift
LISTEN     ?= 127.0.0.1:8080
# libgnutls28-dev: the GnuTLS headers of the TLS shim (Debian's libmicrohttpd is built with GnuTLS).
APT_PKGS   := libmicrohttpd-dev libjansson-dev libgnutls28-dev liburing-dev pkg-config
PYTHON     ?= python3
# make install: $(DESTDIR)$(BINDIR)/iotlbd and $(DESTDIR)$(UNITDIR)/iotlbd.service.
# UNITDIR is in systemd's search path for PREFIX=/usr/local and PREFIX=/usr;
# for any other PREFIX pass UNITDIR=/etc/systemd/system.
PREFIX     ?= /usr/local
DESTDIR    ?=
BINDIR     ?= $(PREFIX)/bin
UNITDIR    ?= $(PREFIX)/lib/systemd/system

.PHONY: all deps tools qemu-tools build release run test test-swift test-readme test-examples test-remote bench-tls test-restarts test-stalled-disk test-dashboards test-dpdk test-qemu test-qemu-restart test-qemu-migration test-guest-net test-ports test-readme-network net-tools test-libvirt libvirt-tools test-systemd test-charts test-package test-tsan test-asan bench charts charts-deps install uninstall clean

all: build

# Installs the Debian packages only when pkg-config cannot find the libraries.
deps:
	@if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libmicrohttpd jansson gnutls liburing; then :; else \
	  echo "installing $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

# What the example and operator tests use: promtool (Debian's prometheus),
# wrk (Debian), openapi-spec-validator and schemathesis (PyPI), dpdk-testpmd with
# its virtio-user and pcap drivers (Debian 12 ships dpdk-testpmd in dpdk-dev, not
# in dpdk); installed only when missing.
tools:
	@command -v dpdk-testpmd >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends dpdk dpdk-dev; }
	@command -v dpdk-testpmd >/dev/null 2>&1 || { echo "dpdk-testpmd still missing after installing dpdk-dev" >&2; exit 1; }
	@command -v promtool >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }
	@$(PYTHON) -c 'import openapi_spec_validator, yaml' 2>/dev/null || \
	  $(PYTHON) -m pip install -q openapi-spec-validator pyyaml
	@command -v st >/dev/null 2>&1 || $(PYTHON) -m pip install -q schemathesis
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# What the QEMU guest test uses: QEMU, a static busybox, cpio and modinfo for the
# initramfs (scripts/qemu-guest/build.sh); installed only when one is missing.
QEMU_PKGS := qemu-system-x86 busybox-static cpio kmod
qemu-tools:
	@dpkg -s $(QEMU_PKGS) >/dev/null 2>&1 || { echo "installing $(QEMU_PKGS)"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(QEMU_PKGS); }

# What the network tests and benchmarks use (integration/netns.py, integration/test_guest_net.py,
# scripts/tap-side-by-side.py): iproute2 (ip netns, ip tuntap), tcpdump (captures in
# the test's namespace), netsniff-ng (trafgen, the RX generator); installed only
# when a command is missing, with apt-get update before the first install.
net-tools:
	@missing=; for c in ip:iproute2 tcpdump:tcpdump trafgen:netsniff-ng; do \
	  PATH=$$PATH:/usr/sbin:/sbin command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# What the libvirt test uses: libvirtd with its QEMU driver, virtlogd and virsh
# (no libvirt-daemon-system: nothing to socket-activate here, so the test starts
# the daemons itself), and the libvirt-qemu user and group QEMU runs as, which
# libvirt-daemon-system would have created (made first: the packages' scripts
# may look them up). The user goes in group kvm, as that package puts it:
# libvirtd probes QEMU with /dev/kvm as root, and when the QEMU user cannot
# open it, it takes every cached probe for outdated and probes QEMU again on
# each define and start (about a minute each here). Each step only when needed.
LIBVIRT_PKGS := libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients
libvirt-tools: qemu-tools
	@getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
	@id -u libvirt-qemu >/dev/null 2>&1 || useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt \
	  --no-create-home --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
	@! getent group kvm >/dev/null || id -nG libvirt-qemu | grep -qw kvm || usermod -a -G kvm libvirt-qemu
	@dpkg -s $(LIBVIRT_PKGS) >/dev/null 2>&1 || { echo "installing $(LIBVIRT_PKGS)"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(LIBVIRT_PKGS); }

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

run: release
	.build/release/iotlbd --listen $(LISTEN) --demo

# The release binary and the systemd unit, its ExecStart fitted to BINDIR.
install: release
	install -D -m 0755 .build/release/iotlbd $(DESTDIR)$(BINDIR)/iotlbd
	sed 's|@BINDIR@|$(BINDIR)|g' examples/systemd/iotlbd.service > .build/iotlbd.service
	install -D -m 0644 .build/iotlbd.service $(DESTDIR)$(UNITDIR)/iotlbd.service

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/iotlbd $(DESTDIR)$(UNITDIR)/iotlbd.service

test: test-swift test-readme test-examples test-remote test-restarts test-stalled-disk test-dashboards test-dpdk test-ports test-qemu test-qemu-restart test-qemu-migration test-guest-net test-readme-network test-libvirt test-systemd test-charts test-package

test-swift: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test

# Runs the README's curl walk-through against a live daemon and compares every answer.
# Then checks the README's target table and picture, and every target's imports, against Package.swift.
test-readme: build
	$(PYTHON) integration/readme_walkthrough.py .build/debug/iotlbd README.md
	$(PYTHON) integration/readme_targets.py README.md

# Runs every example against a live daemon; promtool, OpenAPI validation, SIGTERM.
test-examples: build tools
	$(PYTHON) integration/test_examples.py

# Remote control: TLS with client certificates from a throw-away CA (openssl), scopes
# on every route of the OpenAPI document, SIGHUP reloads under a long-poll, the audit
# log, the failure limit; then the README's "Remote orchestrators" section as written.
test-remote: build
	@command -v openssl >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl curl; }
	@$(PYTHON) -c 'import yaml' 2>/dev/null || $(PYTHON) -m pip install -q pyyaml
	$(PYTHON) integration/test_remote.py
	$(PYTHON) integration/readme_remote.py .build/debug/iotlbd README.md

# The isolation benchmark over TLS: the built-in guest's Mpps while a TLS client (client
# certificate, token) loops GETs, alternated with a plain-HTTP client (BENCHMARKS.md).
bench-tls: release
	$(PYTHON) scripts/tls-isolation.py .build/release/iotlbd

# Restarts: --state-dir across kill -9, damaged state files refused, --config,
# confined vhost-user socket paths, the API on a Unix socket (curl, orchestrator).
test-restarts: build
	$(PYTHON) integration/test_restarts.py

# --state-dir on a loop-mounted ext4 frozen with fsfreeze: changes wait for the
# disk, other devices' traffic, GETs, worker commands and long-polls do not.
# Root; fails (does not skip) without.
test-stalled-disk: build
	$(PYTHON) integration/test_stalled_disk.py

# The Grafana dashboard and the Prometheus rules: JSON checks, promtool check/test
# rules, then a real Prometheus scraping a live daemon answers every panel's query.
test-dashboards: build tools
	$(PYTHON) integration/test_dashboards.py

# DPDK's virtio-user driver (dpdk-testpmd) through a vhost-user device, IOTLB off
# and on; a missing dpdk-testpmd fails; needs root for huge pages and skips, with a
# banner, only where the machine cannot reserve them.
test-dpdk: build tools
	$(PYTHON) integration/test_vhost_user_dpdk.py

# make install into a scratch root, then systemd-analyze verify and security
# (exposure 2.5 or better) on the installed unit, and the installed binary
# started with the unit's arguments. Installs Debian's systemd if it is missing.
test-systemd: release
	@command -v systemd-analyze >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; }
	$(PYTHON) integration/test_systemd.py

# A Debian kernel under QEMU (TCG) with virtio-net on a vhost-user device of the
# daemon, with an Intel vIOMMU (device IOTLB on) and without; fails when QEMU or
# the kernel cannot be had. The guest is cached in .cache/qemu-guest/.
test-qemu: build qemu-tools
	scripts/qemu-guest/build.sh
	$(PYTHON) integration/test_qemu.py

# Restart under traffic: QEMU (the vhost-user server, Intel vIOMMU, strict) sends
# continuously to a client-mode device of a daemon with --state-dir; the daemon is
# killed with -9 three times and started again with no API call; the guest's
# traffic resumes, nothing damaged, no access failure; prints the outage figures.
test-qemu-restart: build qemu-tools
	scripts/qemu-guest/build.sh
	$(PYTHON) integration/test_qemu_restart.py

# Live migration through the IOTLB: a QEMU guest behind the strict Intel vIOMMU
# moves between two daemons (two sockets, as two hosts) under traffic, there
# and back three times, split and packed rings; the paused source's and paused
# destination's memories (QMP pmemsave) must be byte-identical, the source stop
# cleanly, the destination's IOTLB refill by misses, no frame be damaged; with
# the test-only IOTLBD_TEST_UNLOGGED_RX_BUFFERS=1 the comparison must fail.
# Prints downtime, pages logged, frames lost. About 2.5 minutes here.
test-qemu-migration: build qemu-tools
	scripts/qemu-guest/build.sh
	$(PYTHON) integration/test_qemu_migration.py

# Guests on networks through iotlbd's ports: the daemon in a network namespace of
# its own with a TAP port, the busybox guest under QEMU on its vhost-user socket
# behind the strict Intel vIOMMU (the operator's multi_queue TAP), the lazy one
# (a TAP iotlbd makes) and none; the guest pings the TAP's address, sends 50 MiB
# over TCP to a receiver in the namespace and receives 20 MiB (sha256 checked at
# both ends), frames larger than the MTU cross the TAP both ways (TSO), no port
# drops. Two guests on two devices wired by peer ports across two datapath
# workers, each sending to the other. GUEST_NET_BACKEND=qemu-tap: the same on
# QEMU's own -netdev tap (the harness's check and the benchmark's anchor).
# Root; about 3 minutes here.
test-guest-net: build qemu-tools net-tools
	scripts/qemu-guest/build.sh
	$(PYTHON) integration/test_guest_net.py

# README's "Connect a VM to a network", run as written: in a network namespace of
# its own (and /run/iotlbd a private tmpfs), the daemon, an operator's TAP, the
# test guest on a TAP port behind the strict vIOMMU and without one, and two
# guests wired by peer ports. Root; about 1.5 minutes here.
test-readme-network: build qemu-tools net-tools
	scripts/qemu-guest/build.sh
	$(PYTHON) integration/readme_network.py .build/debug/iotlbd README.md

# DPDK's virtio-user through a TAP port of iotlbd in a network namespace: frames
# byte for byte both ways (IOTLB off and on), faults under traffic (TAP down,
# deleted, an oversize frame) while another device keeps moving, and an idle
# device with a TAP under 1 % of a core. Root and 2 MiB huge pages.
test-ports: build tools net-tools
	$(PYTHON) integration/test_ports_dpdk.py

# libvirt as the front door: libvirtd and virtlogd started by the test (no
# systemd) and stopped by PID; the guest of scripts/qemu-guest booted by `virsh
# start` from examples/libvirt/ in both socket directions behind an Intel vIOMMU;
# traffic back, IOTLB misses, updates and invalidations, no connection left after
# `virsh destroy`, iotlbd killed and restarted under the running domain. Then
# with iotlbd in a network namespace of the test's: a domain on a TAP port
# pinging and streaming to the TAP's address, and two domains on peer ports
# pinging and streaming to each other; port counters both ways, no drop.
test-libvirt: build libvirt-tools net-tools
	scripts/qemu-guest/build.sh
	$(PYTHON) integration/test_libvirt.py

# The plotting script on the committed bench/results/*.json, and a tiny
# `iotlb-bench lookup --json` run; fails (does not skip) when it cannot run.
test-charts: build charts-deps
	$(PYTHON) integration/test_charts.py

# A new package depends on a tagged clone of this repository by version and
# uses the IOTLB library (SwiftPM refuses unsafe build flags in a dependency).
test-package: deps
	$(PYTHON) integration/test_package_dependency.py

# The Swift test suite under ThreadSanitizer / AddressSanitizer (own build folders).
# Only the test bundle is built there: the daemon's and the benchmark's own
# sources are not under test in these runs (12 s of a 70 s build here).
TEST_BUNDLE = vhost-iotlbPackageTests
test-tsan: deps
	$(SWIFT) build --product $(TEST_BUNDLE) --sanitize=thread --scratch-path .build-tsan
	$(SWIFT) test --skip-build --sanitize=thread --scratch-path .build-tsan

test-asan: deps
	$(SWIFT) build --product $(TEST_BUNDLE) --sanitize=address --scratch-path .build-asan
	LSAN_OPTIONS=suppressions=$(CURDIR)/integration/lsan.supp $(SWIFT) test --skip-build --sanitize=address --scratch-path .build-asan

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
