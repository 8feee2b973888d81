# Two commands matter on a fresh machine: `make demo` and `make test`. Both install what they
# need first (Debian packages as root, then a virtualenv in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
# The lab runs from the checkout: the installed wheel holds only the product.
LAB := PYTHONPATH=src $(PY) -m encryptrootfs_lab

# Host programs: cryptsetup for the header tier; QEMU, debootstrap and the mkfs tools for the lab;
# GRUB's images and tools, mkfs.vfat and mtools for the lab's disks that boot through GRUB;
# shellcheck for the lint tier (every shell file the product and the lab ship).
APT_PACKAGES := cryptsetup-bin qemu-system-x86 qemu-utils debootstrap fdisk e2fsprogs \
	xfsprogs btrfs-progs zstd cpio ovmf grub-pc-bin grub-efi-amd64-bin dosfstools mtools \
	shellcheck

.PHONY: deps apt venv test test-all test-unit test-header test-vm lint demo clean \
	lab-build lab-boot

deps: apt deb-deps venv

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
	$(LAB) demo

# The lab (README "The lab"): build or reuse the guest image and default disk; boot it once.
# The cache lives outside the checkout (ENCRYPTROOTFS_LAB_CACHE, default /var/tmp/encryptrootfs-lab).
lab-build: deps
	$(LAB) build

lab-boot: deps
	$(LAB) boot

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
	PYTHONPATH=src $(PY) -m bench $(if $(ONLY),--only $(ONLY)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist

# Packages (issue 18, docs/packages.md). The Debian build tools are their own list, installed by
# `make deps` too: the header tier builds the .deb and inspects it (tests/header/test_package.py,
# about 25 s, reused while dist/ is newer than the tree). lintian (large) only for `make deb`.
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	help2man dpkg-dev shellcheck
RPM_CHECK_PACKAGES := rpm rpmlint

.PHONY: deb deb-build deb-deps rpm-check rpm-deps

deb-deps:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(DEB_BUILD_PACKAGES)"

rpm-deps:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(RPM_CHECK_PACKAGES)"

# dpkg-buildpackage writes its outputs next to the checkout; they are moved to dist/. The build
# runs in a copy of the tracked files so that .venv and caches never reach the source package,
# with the system's PATH: pybuild must find Debian's python3, not a pyenv or virtualenv one.
DEB_PATH := /usr/sbin:/usr/bin:/sbin:/bin

deb-build: deb-deps
	rm -rf build/deb dist/encryptrootfs_* dist/encryptrootfs-dracut_*
	mkdir -p build/deb/src dist
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t build/deb/src
	cd build/deb/src && PATH=$(DEB_PATH) dpkg-buildpackage -us -uc -b
	mv build/deb/*.deb build/deb/*.buildinfo build/deb/*.changes dist/
	rm -rf build/deb

deb: deb-build
	@$(MAKE) --no-print-directory apt APT_PACKAGES=lintian
	PATH=$(DEB_PATH) lintian --fail-on error,warning dist/encryptrootfs_*.changes

# The spec is checked here as far as a Debian host allows; the build itself runs on the target
# distribution (docs/packages.md).
# rpmspec reports some parse errors on stderr with exit status 0: any stderr output fails.
rpm-check: rpm-deps
	@err=$$(rpmspec -P rpm/encryptrootfs.spec 2>&1 >/dev/null); \
	if [ -n "$$err" ]; then echo "$$err" >&2; exit 1; fi; echo "rpmspec -P: ok"
	rpmlint --rpmlintrc rpm/encryptrootfs.rpmlintrc rpm/encryptrootfs.spec
