"""Cloud Hypervisor snapshots (x86_64, KVM) read as vmm vCPU states. Pure, no KVM.

A Cloud Hypervisor snapshot is a directory with config.json, state.json and memory-ranges (the guest
memory ranges the node "memory-manager" lists as memory_ranges.data [{gpa, length}], back to back in
that order; vmm/src/memory_manager.rs). Its
state.json is a tree of vm_migration::Snapshot nodes: {"snapshots": {id: node}, "snapshot_data":
{"state": "<JSON text>"} | null}. The root's data is the VmSnapshot (clock, common_cpuid); the node
"cpu-manager" has one child per vCPU ("0", "1", ...) whose data is a hypervisor::CpuState,
{"Kvm": VcpuKvmState} for KVM (Cloud Hypervisor vm-migration/src/lib.rs, vmm/src/vm.rs,
vmm/src/cpu.rs, hypervisor/src/kvm/x86_64/mod.rs, hypervisor/src/arch/x86/mod.rs). VcpuKvmState:

  cpuid        [{function, index, flags, eax, ebx, ecx, edx}]       hypervisor::arch::x86::CpuIdEntry
  msrs         [{index, data}]                                       MsrEntry
  vcpu_events, regs, sregs, xcrs, mp_state    kvm-bindings structs serialised by zerocopy as byte
               arrays (struct kvm_vcpu_events, kvm_regs, kvm_sregs, kvm_xcrs, kvm_mp_state)
  fpu          FpuState (the same x87/SSE state as the XSAVE legacy region; not used here)
  lapic_state  {"regs": [1024 c_char]}                               struct kvm_lapic_state
  xsave        {"region": [1024 u32], "extra": [u32, ...]}           struct kvm_xsave: region is
               the first 4096 bytes, extra the KVM_GET_XSAVE2 tail (AMX tile data), little endian
  tsc_khz      u32 | null;  nested_state, hyperv_synic: not used here

Debug registers are not saved by Cloud Hypervisor: the states read here have none.
"""

import os
import struct

from . import files
from ._bindings import ffi
from .cpuid import CpuidEntry, CpuidError, CpuidTable
from .cstructs import Regs, Sregs
from .errors import VmmError

STATE_FILE = "state.json"
MEMORY_FILE = "memory-ranges"
MAX_STATE_BYTES = 256 << 20  # a state.json is a few hundred KiB per vCPU; refuse absurd files
KVM_XSAVE_REGION_WORDS = 1024


class ChSnapshotError(VmmError):
    """A Cloud Hypervisor snapshot vmm cannot read: says what and where."""


def is_ch_snapshot(path) -> bool:
    """True for a directory holding a Cloud Hypervisor state.json (judged by its top-level keys)."""
    f = os.path.join(path, STATE_FILE)
    if not (os.path.isdir(path) and os.path.isfile(f)):
        return False
    with open(f, "rb") as fh:
        head = fh.read(64).lstrip()
    return head.startswith(b"{") and (b'"snapshots"' in head or b'"snapshot_data"' in head)


class ChSnapshot:
    """What `vmm.snapshot.Snapshot` offers to readers (path, meta, vcpus, guest_cpuid()), read from a
    Cloud Hypervisor snapshot directory. vcpus are vmm.state.VcpuState."""

    def __init__(self, path, vcpus, common_cpuid, clock, memory_ranges=(), memory_file=None):
        self.path = path
        self.memory_ranges = list(memory_ranges)  # [(gpa, length, offset in memory_file)]
        self.memory_file = memory_file            # memory-ranges, or None when absent
        self.vcpus = vcpus
        self.common_cpuid = common_cpuid
        self.meta = {"format": "cloud-hypervisor", "host": {}, "guest": {"name": os.path.basename(
            os.path.normpath(path))}, "vm": {"vcpus": len(vcpus), "memory": []}}
        self.vm = {"clock": clock}

    def guest_cpuid(self):
        return self.vcpus[0].cpuid if self.vcpus else self.common_cpuid


def load(path) -> ChSnapshot:
    """Read a Cloud Hypervisor snapshot directory; raises ChSnapshotError naming what is wrong."""
    f = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path):
        raise ChSnapshotError(f"{path}: not a directory (a Cloud Hypervisor snapshot is a directory "
                              f"with {STATE_FILE})")
    root = _json(files.read_bytes(f, "Cloud Hypervisor state file", MAX_STATE_BYTES), f)
    node = _node(root, f, "the root")
    vm_data = _data(node, f, "the root") or {}
    cpus = _node(node["snapshots"].get("cpu-manager"), f, "snapshots.cpu-manager")
    ids = sorted(cpus["snapshots"], key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    if not ids:
        raise ChSnapshotError(f"{f}: the cpu-manager holds no vCPU")
    vcpus = []
    for i in ids:
        where = f"vCPU {i}"
        data = _data(_node(cpus["snapshots"][i], f, where), f, where)
        if not isinstance(data, dict) or len(data) != 1:
            raise ChSnapshotError(f"{f}: {where}: expected a CpuState object such as {{\"Kvm\": ...}}")
        (kind, st), = data.items()
        if kind != "Kvm":
            raise ChSnapshotError(f"{f}: {where}: {kind} state; vmm reads the x86_64 KVM state only")
        vcpus.append(_vcpu_state(st, f, where))
    ranges, mem_file = _memory(node["snapshots"].get("memory-manager"), path, f)
    common = None
    if isinstance(vm_data, dict) and vm_data.get("common_cpuid"):
        common = _cpuid(vm_data["common_cpuid"], f, "common_cpuid")
    return ChSnapshot(path, vcpus, common, vm_data.get("clock") if isinstance(vm_data, dict) else None,
                      ranges, mem_file)


def _memory(node, path, f):
    """The guest memory ranges the memory manager saved ({"memory_ranges": {"data": [{gpa, length}]}})
    and their file, memory-ranges, which holds them back to back in that order."""
    if node is None:
        return [], None
    data = _data(_node(node, f, "snapshots.memory-manager"), f, "the memory-manager") or {}
    table = data.get("memory_ranges", {}) if isinstance(data, dict) else {}
    items = table.get("data", []) if isinstance(table, dict) else None
    if not isinstance(items, list):
        raise ChSnapshotError(f"{f}: the memory-manager's memory_ranges has no 'data' list")
    ranges, offset = [], 0
    for n, r in enumerate(items):
        if (not isinstance(r, dict) or not all(isinstance(r.get(k), int) and 0 <= r[k] < 1 << 64
                                               for k in ("gpa", "length"))):
            raise ChSnapshotError(f"{f}: memory_ranges.data[{n}]: expected u64 gpa and length")
        ranges.append((r["gpa"], r["length"], offset))
        offset += r["length"]
    mem_file = os.path.join(path, MEMORY_FILE)
    if not ranges or not os.path.isfile(mem_file):
        return ranges, None
    size = os.stat(mem_file).st_size
    if size < offset:
        raise ChSnapshotError(f"{mem_file}: {size} bytes, the memory ranges need {offset}: truncated")
    return ranges, mem_file


def _json(raw, where):
    try:
        return files.parse_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChSnapshotError(f"{where}: not valid JSON: {e}") from None


def _node(obj, f, where):
    if not isinstance(obj, dict) or not isinstance(obj.get("snapshots"), dict):
        raise ChSnapshotError(f"{f}: {where}: not a Cloud Hypervisor snapshot node "
                              "(an object with 'snapshots')")
    return obj


def _data(node, f, where):
    d = node.get("snapshot_data")
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("state"), str):
        raise ChSnapshotError(f"{f}: {where}: snapshot_data without a 'state' string")
    return _json(d["state"], f"{f}: {where}: snapshot_data.state")


def _bytes(v, size, f, where, signed=False):
    """A zerocopy-serialised struct: a list of byte values; kvm-bindings zero-pads or truncates a
    list of another length, and so does this."""
    if not isinstance(v, list) or not all(isinstance(b, int) for b in v):
        raise ChSnapshotError(f"{f}: {where}: expected a list of byte values")
    lo = -128 if signed else 0
    bad = [b for b in v if not lo <= b <= 255]
    if bad:
        raise ChSnapshotError(f"{f}: {where}: {bad[0]} is not a byte value")
    raw = bytes(b & 0xFF for b in v)
    return (raw + bytes(size))[:size]


def _struct(raw, ctype):
    c = ffi.new(f"{ctype} *")
    ffi.memmove(c, raw, len(raw))
    return c


def _cpuid(entries, f, where):
    if not isinstance(entries, list):
        raise ChSnapshotError(f"{f}: {where}: expected a list of CPUID entries")
    table = CpuidTable()
    keys = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    try:
        for n, e in enumerate(entries):
            if not isinstance(e, dict) or any(not isinstance(e.get(k), int) or not 0 <= e[k] < 1 << 32
                                             for k in keys):
                raise ChSnapshotError(f"{f}: {where}[{n}]: expected u32 fields {', '.join(keys)}")
            table.put(CpuidEntry(*(e[k] for k in keys)))
    except CpuidError as e:
        raise ChSnapshotError(f"{f}: {where}: {e}") from None
    return table


def _vcpu_state(st, f, where):
    from .state import VcpuState
    if not isinstance(st, dict):
        raise ChSnapshotError(f"{f}: {where}: the KVM state is not an object")
    missing = [k for k in ("cpuid", "msrs", "regs", "sregs", "xsave", "xcrs", "mp_state", "vcpu_events")
               if k not in st]
    if missing:
        raise ChSnapshotError(f"{f}: {where}: the KVM state lacks {', '.join(missing)}")
    regs = Regs.from_c(_struct(_bytes(st["regs"], ffi.sizeof("struct kvm_regs"), f, f"{where}.regs"),
                               "struct kvm_regs"))
    sregs = Sregs.from_c(_struct(_bytes(st["sregs"], ffi.sizeof("struct kvm_sregs"), f, f"{where}.sregs"),
                                 "struct kvm_sregs"))
    xcrs_c = _struct(_bytes(st["xcrs"], ffi.sizeof("struct kvm_xcrs"), f, f"{where}.xcrs"), "struct kvm_xcrs")
    if xcrs_c.nr_xcrs > 16:
        raise ChSnapshotError(f"{f}: {where}.xcrs: nr_xcrs {xcrs_c.nr_xcrs} > 16 (KVM_MAX_XCRS)")
    xcrs = {xcrs_c.xcrs[i].xcr: xcrs_c.xcrs[i].value for i in range(xcrs_c.nr_xcrs)}
    (mp_state,) = struct.unpack("<I", _bytes(st["mp_state"], 4, f, f"{where}.mp_state"))
    events = _bytes(st["vcpu_events"], ffi.sizeof("struct kvm_vcpu_events"), f, f"{where}.vcpu_events")
    msrs = {}
    if not isinstance(st["msrs"], list):
        raise ChSnapshotError(f"{f}: {where}.msrs: expected a list of {{index, data}}")
    for n, m in enumerate(st["msrs"]):
        if (not isinstance(m, dict) or not isinstance(m.get("index"), int) or not isinstance(m.get("data"), int)
                or not 0 <= m["index"] < 1 << 32 or not 0 <= m["data"] < 1 << 64):
            raise ChSnapshotError(f"{f}: {where}.msrs[{n}]: expected u32 index and u64 data")
        msrs[m["index"]] = m["data"]
    lapic = None
    if isinstance(st.get("lapic_state"), dict) and "regs" in st["lapic_state"]:
        lapic = _bytes(st["lapic_state"]["regs"], 1024, f, f"{where}.lapic_state", signed=True)
    tsc = st.get("tsc_khz")
    if tsc is not None and (not isinstance(tsc, int) or not 0 <= tsc < 1 << 32):
        raise ChSnapshotError(f"{f}: {where}.tsc_khz: expected a u32 or null")
    return VcpuState(cpuid=_cpuid(st["cpuid"], f, f"{where}.cpuid"), mp_state=mp_state, regs=regs,
                     sregs=sregs, xsave=_xsave(st["xsave"], f, f"{where}.xsave"), xcrs=xcrs, msrs=msrs,
                     events=events, debugregs=b"", lapic=lapic, tsc_khz=tsc or 0)


def _xsave(x, f, where):
    """region (1024 u32) + extra (u32s): the KVM_GET_XSAVE2 buffer, little endian."""
    if not isinstance(x, dict) or not isinstance(x.get("region"), list):
        raise ChSnapshotError(f"{f}: {where}: expected {{region: [1024 u32], extra: [u32]}}")
    region, extra = x["region"], x.get("extra") or []
    if len(region) != KVM_XSAVE_REGION_WORDS:
        raise ChSnapshotError(f"{f}: {where}.region: {len(region)} words, struct kvm_xsave has "
                              f"{KVM_XSAVE_REGION_WORDS}")
    words = region + list(extra) if isinstance(extra, list) else None
    if words is None or not all(isinstance(w, int) and 0 <= w < 1 << 32 for w in words):
        raise ChSnapshotError(f"{f}: {where}: region and extra must hold u32 values")
    return struct.pack(f"<{len(words)}I", *words)
