#!/bin/bash
# Runs inside the test-kernels VM, chrooted into the host's root (read-only 9p + tmpfs overlay), so the
# project's own venv and Python run against the VM kernel's /dev/kvm. $1 is the results directory (a
# writable 9p share the host reads back); run.env there (written by tests/kernels/harness.py) says what
# to run. Every step is bounded by `timeout`; its exit status goes to steps.tsv.
set -u
R=$1
. "$R/run.env"
cd "$PROJECT" || exit 1
export CI=true PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp LANG=C.UTF-8 TMPDIR=/tmp
export PATH="$PROJECT/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
: > "$R/steps.tsv"

# pytest-timeout's thread method: its signal method would take SIGALRM, which vmm's run loop uses.
# A stalled test then ends the process (stacks dumped); -v output names the test.
PYTEST="python -m pytest -p no:cacheprovider -v --timeout-method thread"

# step NAME SECONDS CMD...: run CMD with a time limit, output to NAME.out, status to steps.tsv
step() {
    local name=$1 limit=$2; shift 2
    echo "VMM-KERNELS: step-start $name"
    timeout -k 10 "$limit" "$@" > "$R/$name.out" 2> "$R/$name.err"
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$limit" >> "$R/steps.tsv"
    echo "VMM-KERNELS: step-end $name $rc"
    sync
}

for s in $STEPS; do
    case $s in
    caps)
        step caps 120 vmm caps --json ;;
    cpuid)  # KVM_GET_SUPPORTED_CPUID: the XSAVE layout the harness prints
        step cpuid 120 vmm cpuid --json ;;
    probe)
        step probe "$PROBE_TIMEOUT" vmm probe --json -o "$R/probe.json" ;;
    guests)
        mkdir -p "$R/guests"
        vmm guests --json > "$R/guests.json"
        for g in $(python -c 'import json, sys; print(*[g["name"] for g in json.load(sys.stdin)])' \
                   < "$R/guests.json"); do
            # SKIP_GUESTS: guests this target cannot end (the harness prints why)
            case " ${SKIP_GUESTS:-} " in *" $g "*) continue ;; esac
            t=$GUEST_TIMEOUT
            [ "$g" = spin ] && t=2
            for cpl in 3 0; do
                step "guests/$g-cpl$cpl" $((t * 3 + 60)) vmm run "$g" --cpl $cpl --timeout "$t" --json
            done
        done ;;
    pytest-amx)
        step pytest-amx "$PYTEST_TIMEOUT" $PYTEST -m amx \
            --timeout "$TEST_TIMEOUT" --junitxml "$R/pytest-amx.xml" $PYTEST_ARGS tests ;;
    pytest)  # one process per test file: a test that stalls ends only its own file's process
        mkdir -p "$R/pytest"
        # PYTEST_FILES: the files the harness chose (the host-only ones left out), one process each
        for f in ${PYTEST_FILES:-tests/test_*.py}; do
            n=$(basename "${f%%::*}" .py)
            step "pytest/$n" "$PYTEST_TIMEOUT" $PYTEST -m "${PYTEST_MARK:-not amx}" \
                --timeout "$TEST_TIMEOUT" --junitxml "$R/pytest/$n.xml" $PYTEST_ARGS "$f"
        done ;;
    cmd)  # --cmd: one shell command, for looking into a kernel by hand
        step cmd "$PYTEST_TIMEOUT" bash -c "$CMD" ;;
    *)
        echo "VMM-KERNELS: unknown step $s" ;;
    esac
done
echo "VMM-KERNELS: finished"
