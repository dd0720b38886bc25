#!/bin/sh
# Builds the Linux KVM selftests that vmm's probe checks derive from, from Debian's linux-source
# package, and runs each once on this host: whether the selftest binary itself runs here (on PVM
# hosts most need guest CPL0 code with SSE/AVX, which PVM emulates and cannot run).
# Not part of `make test` (downloads ~150 MB, builds for minutes). Usage: bench/kvm-selftests.sh [OUTDIR]
# Prints one line per selftest: name, exit status, PASS/FAIL/SKIP and the last line of its output.
set -eu
OUT=${1:-$(dirname "$0")/build/kvm-selftests}
TESTS="state_test xcr0_cpuid_test xss_msr_test cpuid_test feature_msrs_test sync_regs_test userspace_io_test hwcr_msr_test amx_test msrs_test"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ ! -d "$OUT/src" ]; then
    if ! ls /usr/src/linux-source-*.tar.xz >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-source >/dev/null
    fi
    TARBALL=$(ls /usr/src/linux-source-*.tar.xz | sort -V | tail -1)
    mkdir -p "$OUT/src.tmp"
    # only what the KVM selftests and `make headers` need
    tar -C "$OUT/src.tmp" --strip-components=1 -xJf "$TARBALL" --wildcards \
        '*/Makefile' '*/Kbuild' '*/scripts' '*/include' '*/arch/x86' '*/tools' '*/usr' 2>/dev/null || true
    mv "$OUT/src.tmp" "$OUT/src"
fi
SRC="$OUT/src"
VERSION=$(make -s -C "$SRC" kernelversion 2>/dev/null || echo unknown)
[ -f "$SRC/usr/include/linux/kvm.h" ] || make -s -C "$SRC" headers >/dev/null
# the ones that exist in this kernel's tree (msrs_test came in 6.18; older trees name the dir x86_64)
DIR=tools/testing/selftests/kvm
TARGETS=""
for t in $TESTS; do
    for d in x86 x86_64; do
        # the Makefile names its programs by absolute path ($(OUTPUT) is the kvm directory)
        [ -f "$SRC/$DIR/$d/$t.c" ] && TARGETS="$TARGETS $SRC/$DIR/$d/$t"
    done
done
make -s -C "$SRC/$DIR" -k -j2 $TARGETS >"$OUT/build.log" 2>&1 || { echo "build failed: see $OUT/build.log"; tail -5 "$OUT/build.log"; exit 1; }
echo "KVM selftests of Linux $VERSION on $(uname -r) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
for t in $TESTS; do
    bin=""
    for d in x86 x86_64; do
        [ -x "$SRC/$DIR/$d/$t" ] && bin="$SRC/$DIR/$d/$t"
    done
    if [ -z "$bin" ]; then
        printf '%-20s %s\n' "$t" "not in Linux $VERSION"
        continue
    fi
    set +e
    timeout 60 "$bin" >"$OUT/$t.log" 2>&1
    rc=$?
    set -e
    case $rc in 0) verdict=PASS ;; 4) verdict=SKIP ;; 124) verdict="TIMEOUT (60 s)" ;; *) verdict=FAIL ;; esac
    # the reason: the last line naming an unexpected exit or a skip, else the last line
    last=$({ grep -E 'nexpected|# SKIP' "$OUT/$t.log" || grep -v '^[[:space:]]*$' "$OUT/$t.log"; } | tail -1 |
           sed 's/^[[:space:]]*//' | cut -c1-110)
    printf '%-20s rc=%-3s %-6s %s\n' "$t" "$rc" "$verdict" "$last"
done
