"""The guest runtime the VMM builds in guest memory: long mode, identity-mapped page tables
(U/S=1), a GDT with kernel and user segments, a 64-bit TSS with RSP0 and an I/O bitmap that
allows every port, an IDT pointing at the CPL0 stubs, and the CPL3 (or CPL0) entry state.

Guest-physical layout (identity mapped):
  0x1000 GDT   0x2000 IDT   0x3000 TSS (+ I/O bitmap)   0x6000 CPL0 runtime (runtime.bin)
  0x8000..0x10000 CPL0 stack (RSP0 = 0x10000)
  0x20000 PML4  0x21000 PDPT  0x22000.. page directories (2 MiB pages, one per GiB)
  0x100000 payload   0x300000 scratch (user stack grows down from here)
"""

import struct
from dataclasses import dataclass

from ..cstructs import DTable, Regs, Segment, Sregs
from ..records import Record

GDT_BASE = 0x1000
IDT_BASE = 0x2000
TSS_BASE = 0x3000
RUNTIME_BASE = 0x6000
KERNEL_STACK_TOP = 0x10000   # RSP0
PML4_BASE = 0x20000
PDPT_BASE = 0x21000
PD_BASE = 0x22000
MAX_PDS = 16                 # page directories end below 0x40000: maps up to 16 GiB
PAYLOAD_BASE = 0x100000
SCRATCH_BASE = 0x300000
USER_STACK_TOP = SCRATCH_BASE
MIN_MEMORY = 4 << 20
MAX_VCPUS = 32               # one 64 KiB user stack each, below SCRATCH_BASE and above the payload
DEFAULT_MEMORY = 4 << 20

# Selectors (GDT index << 3 | RPL)
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x18 | 3, 0x20 | 3, 0x28

TSS_IOMAP_BASE = 0x68
TSS_LIMIT = TSS_IOMAP_BASE + 8192  # bitmap for 65536 ports, then one 0xff terminator byte

# Architectural bits
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE, CR4_PKE = 1 << 5, 1 << 9, 1 << 10, 1 << 18, 1 << 22
EFER_SCE, EFER_LME, EFER_LMA = 1 << 0, 1 << 8, 1 << 10
RFLAGS_FIXED, RFLAGS_IOPL3 = 0x2, 0x3000
PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7

def _gdt_entry(base, limit, access, flags):
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF)


def build_gdt():
    gdt = bytearray()
    gdt += bytes(8)                                   # null
    gdt += _gdt_entry(0, 0xFFFFF, 0x9A, 0xA)          # 0x08 kernel code: P, DPL0, code, L=1, G
    gdt += _gdt_entry(0, 0xFFFFF, 0x92, 0xC)          # 0x10 kernel data
    gdt += _gdt_entry(0, 0xFFFFF, 0xF2, 0xC)          # 0x18 user data: DPL3
    gdt += _gdt_entry(0, 0xFFFFF, 0xFA, 0xA)          # 0x20 user code: DPL3, L=1
    gdt += _gdt_entry(TSS_BASE, TSS_LIMIT, 0x89, 0x0)  # 0x28 64-bit TSS (available), low half
    gdt += struct.pack("<II", TSS_BASE >> 32, 0)        # high half
    return bytes(gdt)


def build_idt(stub_base):
    idt = bytearray()
    for vec in range(256):
        handler = stub_base + 16 * vec
        # interrupt gate (0xE), present; DPL3 for int3/into so a CPL3 payload may raise them
        dpl = 3 if vec in (3, 4) else 0
        attr = 0x80 | (dpl << 5) | 0xE
        idt += struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, 0, attr,
                           (handler >> 16) & 0xFFFF, handler >> 32, 0)
    return bytes(idt)


def build_tss():
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)        # RSP0
    struct.pack_into("<H", tss, 0x66, TSS_IOMAP_BASE)       # I/O map base
    tss[TSS_LIMIT] = 0xFF                                   # bitmap terminator; all ports allowed
    return bytes(tss)


def build_page_tables(mem_size):
    """PML4 -> one PDPT -> one PD per GiB of 2 MiB pages, identity, U/S=1 RW=1. At least the first
    4 GiB are mapped, so guests can reach unbacked addresses (MMIO exits) below 4 GiB."""
    gib = max(4, (mem_size + (1 << 30) - 1) >> 30)
    if gib > MAX_PDS:
        raise ValueError(f"guest memory of {mem_size} bytes exceeds the runtime's {MAX_PDS} GiB map")
    flags = PTE_P | PTE_RW | PTE_US
    pml4 = struct.pack("<Q", PDPT_BASE | flags) + bytes(4088)
    pdpt = b"".join(struct.pack("<Q", (PD_BASE + 0x1000 * i) | flags) for i in range(gib))
    pdpt += bytes(4096 - len(pdpt))
    pds = struct.pack(f"<{512 * gib}Q", *range(flags | PTE_PS, (512 * gib) << 21, 1 << 21))  # entry i: i << 21 | flags
    return pml4, pdpt, pds


@dataclass(init=False, repr=False, eq=False)  # cheap to build: vmm/records.py
class EntryState(Record):
    """The registers a vCPU starts the payload with."""

    regs: Regs
    sregs: Sregs

    def __init__(self, regs, sregs):
        self.regs, self.sregs = regs, sregs


def _seg(selector, code, dpl):
    if code:
        return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=0xB, present=1, dpl=dpl,
                       db=0, s=1, l=1, g=1)
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=0x3, present=1, dpl=dpl,
                   db=1, s=1, l=0, g=1)


def entry_state(cpl=3, xsave=True, entry=PAYLOAD_BASE, base_sregs=None, stack_top=USER_STACK_TOP,
                pke=False):
    """Registers that start the payload at `entry` in 64-bit mode at the given CPL. `pke` sets
    CR4.PKE (protection keys: WRPKRU/RDPKRU at CPL3; KVM accepts it only when the guest CPUID
    has PKU)."""
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    s = base_sregs or Sregs()
    if cpl == 3:
        s.cs, data = _seg(USER_CS, True, 3), _seg(USER_DS, False, 3)
    else:
        s.cs, data = _seg(KERNEL_CS, True, 0), _seg(KERNEL_DS, False, 0)
    s.ss = data
    s.ds, s.es, s.fs, s.gs = (Segment(**vars(data)) for _ in range(4))
    s.tr = Segment(base=TSS_BASE, limit=TSS_LIMIT, selector=TSS_SEL, type=0xB, present=1, s=0)
    s.ldt = Segment(selector=0, type=0x2, present=0, unusable=1)
    s.gdt = DTable(GDT_BASE, 7 * 8 - 1)
    s.idt = DTable(IDT_BASE, 256 * 16 - 1)
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.cr3 = PML4_BASE
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if xsave else 0) | (CR4_PKE if pke else 0)
    s.efer = EFER_SCE | EFER_LME | EFER_LMA
    regs = Regs(rip=entry, rsp=stack_top, rflags=RFLAGS_FIXED | RFLAGS_IOPL3)
    return EntryState(regs, s)


def install(vm, runtime, payload, mem):
    """Write the runtime tables, the CPL0 stubs (a catalog Image) and the payload into guest memory.
    `payload` is flat bytes for PAYLOAD_BASE, or [(guest-physical address, bytes)] (ELF segments,
    checked against memory by catalog.Image.check_fits)."""
    if isinstance(payload, (bytes, bytearray)):
        if len(payload) > SCRATCH_BASE - PAYLOAD_BASE:
            raise ValueError(f"payload of {len(payload)} bytes does not fit between 0x{PAYLOAD_BASE:x} and "
                             f"0x{SCRATCH_BASE:x}")
        payload = [(PAYLOAD_BASE, payload)]
    vm.write(GDT_BASE, build_gdt())
    vm.write(IDT_BASE, build_idt(RUNTIME_BASE))
    vm.write(TSS_BASE, build_tss())
    vm.write(RUNTIME_BASE, runtime.code)
    pml4, pdpt, pds = build_page_tables(mem)
    vm.write(PML4_BASE, pml4)
    vm.write(PDPT_BASE, pdpt)
    vm.write(PD_BASE, pds)
    for addr, data in payload:
        vm.write(addr, data)
