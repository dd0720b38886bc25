"""Where a vCPU state comes from, for the commands that read registers (reg, inspect, diff):
a vmm snapshot file or a Cloud Hypervisor snapshot directory (read only, no KVM), or a running guest
stopped at a SYNC (the caller saves its vCPUs with vmm.state.save_state)."""

import os
from dataclasses import dataclass, field

from .errors import VmmError
from .regfile import RegisterFile
from .xsave import XsaveError, XsaveLayout

SNAPSHOT_MAGIC = b"VMMSNAP\0"


class SourceError(VmmError):
    """A state source that cannot be read or lacks what was asked (e.g. a vCPU number)."""


@dataclass
class StateSource:
    label: str
    kind: str                # "snapshot", "cloud-hypervisor", "guest"
    vcpus: list              # vmm.state.VcpuState per vCPU
    layout: XsaveLayout = None  # the XSAVE layout of the buffers (the saving host's), when known
    snapshot: object = None  # the vmm.snapshot.Snapshot or vmm.chsnap.ChSnapshot
    extra: dict = field(default_factory=dict)

    def check_vcpu(self, i):
        if not 0 <= i < len(self.vcpus):
            raise SourceError(f"{self.label} has {len(self.vcpus)} vCPU{'s' * (len(self.vcpus) != 1)}; "
                              f"there is no vCPU {i}")
        return i

    def regfile(self, i=0):
        return RegisterFile(self.vcpus[self.check_vcpu(i)], self.layout)


def kind_of(spec):
    """'snapshot', 'cloud-hypervisor' or 'guest' (a built-in guest name or a guest file), by content."""
    from .chsnap import is_ch_snapshot
    if os.path.isdir(spec):
        if is_ch_snapshot(spec):
            return "cloud-hypervisor"
        raise SourceError(f"{spec}: a directory that is not a Cloud Hypervisor snapshot (no regular state.json "
                          "holding a snapshot tree)")
    if os.path.isfile(spec):
        with open(spec, "rb") as f:
            if f.read(len(SNAPSHOT_MAGIC)) == SNAPSHOT_MAGIC:
                return "snapshot"
    return "guest"


def open_file_source(spec):
    """A StateSource from a vmm snapshot file or a Cloud Hypervisor snapshot directory."""
    kind = kind_of(spec)
    if kind == "snapshot":
        from . import snapshot
        snap = snapshot.load(spec)
        layout = None
        host_layout = (snap.meta.get("host") or {}).get("xsave_layout")
        if host_layout:
            try:
                layout = XsaveLayout.from_json(host_layout)
            except XsaveError:
                layout = None
        return StateSource(f"snapshot {spec}", kind, snap.vcpus, layout, snap)
    if kind == "cloud-hypervisor":
        from . import chsnap
        snap = chsnap.load(spec)
        # Cloud Hypervisor gives the guest the host's CPUID leaf 0xD: its offsets are the buffer's
        return StateSource(f"Cloud Hypervisor snapshot {spec}", kind, snap.vcpus, None, snap)
    from . import files
    try:  # the precise reason for a path that is no file to read (missing, empty, device, /proc)
        files.check_input(spec, "vmm snapshot or Cloud Hypervisor snapshot directory")
    except files.FileError as e:
        raise SourceError(str(e)) from None
    raise SourceError(f"{spec}: not a vmm snapshot or a Cloud Hypervisor snapshot directory")


def from_machine(m, label=None):
    """A StateSource of a running Machine's vCPUs as they are now (each saved with save_state)."""
    from .state import save_state
    states = [save_state(v) for v in m.vcpus]
    layout = XsaveLayout.from_cpuid(m.kvm.get_supported_cpuid())  # KVM's buffer uses the host's offsets
    return StateSource(label or f"guest {m.image.name}", "guest", states, layout)
