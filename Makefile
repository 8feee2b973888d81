# Two commands matter on a fresh machine: `make demo` and `make test`. Both install what they
# need first (Debian packages as root, then a virtualenv in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

# Host programs: cryptsetup for the header tier; QEMU, debootstrap and the mkfs tools for the lab;
# GRUB's images and tools, mkfs.vfat and mtools for the lab's disks that boot through GRUB.
APT_PACKAGES := cryptsetup-bin qemu-system-x86 qemu-utils debootstrap fdisk e2fsprogs \
	xfsprogs btrfs-progs zstd cpio ovmf grub-pc-bin grub-efi-amd64-bin dosfstools mtools

.PHONY: deps apt venv test test-all test-unit test-header test-vm lint demo clean \
	lab-build lab-boot

deps: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (run as root to install): $$missing" >&2; exit 1; fi; \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The ten slowest tests at the end of each run (tests/support/timing.py adds each tier's time
# and the guests' time).
DURATIONS := --durations=10 --durations-min=1

# Every tier; the vm tier as its representative subset (cases marked `slow` run in test-all).
test: deps
	$(PYTEST) $(DURATIONS) -m "not slow"

test-all: deps
	$(PYTEST) $(DURATIONS)

test-unit: venv
	$(PYTEST) -m unit

test-header: deps
	$(PYTEST) -m header

test-vm: deps
	$(PYTEST) -m vm

lint: venv
	$(PYTEST) -m lint

demo: deps
	$(VENV)/bin/encryptrootfs-lab demo

# The lab (README "The lab"): build or reuse the guest image and default disk; boot it once.
# The cache lives outside the checkout (ENCRYPTROOTFS_LAB_CACHE, default /var/tmp/encryptrootfs-lab).
lab-build: deps
	$(VENV)/bin/encryptrootfs-lab build

lab-boot: deps
	$(VENV)/bin/encryptrootfs-lab boot

# Benchmarks (issues 8, 19): bench/results.json, bench/*.png and bench/RESULTS.md. Pieces one at
# a time with `make bench ONLY=fleet` (initramfs, fleet, disk, boot; native: no guest, the
# product on the host's CPU beside its peers); BENCH_ARGS=--small for a try.
.PHONY: bench
ONLY ?=
BENCH_ARGS ?=

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

bench: deps $(VENV)/.bench-installed
	$(PY) -m bench $(if $(ONLY),--only $(ONLY)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
