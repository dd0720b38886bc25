# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all dev guests run test test-amx test-kernels bench clean

all: dev guests

$(PY):
	$(PYTHON) -m venv $(VENV)

# editable install: compiles the cffi bindings (vmm/_kvm*.so) against <linux/kvm.h>
$(STAMP): $(PY) pyproject.toml setup.py vmm/_build.py vmm/_ioctls.py $(wildcard cdefs/*)
	$(PY) -m pip install -q --upgrade pip
	# the flat layout's editable install is intended: setuptools' notice about it is noise here
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[test]'
	touch $@

dev: $(STAMP)

guests:
	$(MAKE) -s -C guests

run: dev guests
	$(VENV)/bin/vmm run

# two processes: the AMX tests ask for the AMX guest permission, which changes KVM's answers for
# the rest of their process (see tests/conftest.py); the main suite runs last
test: dev guests
	$(PY) -m pytest -q -m amx tests
	$(PY) -m pytest -q -m "not amx" tests

# on AMX hosts: the AMX tests must run, so a missing AMX is a failure there, not a skip
test-amx: dev guests
	VMM_REQUIRE_AMX=1 $(PY) -m pytest -q -m amx tests

# the suite on ordinary KVM: Debian's 6.1 and 6.12 kernels booted under QEMU TCG load kvm_amd and run
# vmm probe, every guest at CPL3 and CPL0 and pytest inside (root and apt needed; tests/kernels/harness.py);
# INTEL=1 adds 6.12 with kvm_intel under Bochs 3.0, built from ../shared/vendor (tests/kernels/bochs.py)
test-kernels: dev guests
	$(PY) tests/kernels/harness.py $(if $(filter 1,$(INTEL)),--intel) $(KERNELS_ARGS)

# one table measured in one run (bench/bench.py; --json for machines: make bench BENCH_ARGS=--json)
bench: dev guests
	$(PY) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build bench/build *.egg-info vmm/_kvm.c vmm/_kvm.o vmm/_kvm*.so
	$(MAKE) -s -C guests clean
