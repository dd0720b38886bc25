"""Dataclasses for the fixed-layout vCPU register structs (kvm_regs, kvm_sregs).

Field names are the uAPI's; conversion to and from cdata goes through the
struct's own field list, so no offset is written here.
"""

from dataclasses import asdict, dataclass, field, fields

from ._bindings import ffi

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _names(cls):
    """Field names of a dataclass, computed once (dataclasses.fields() is slow on hot paths)."""
    names = cls.__dict__.get("_field_names")
    if names is None:
        names = tuple(f.name for f in fields(cls))
        cls._field_names = names
    return names


def _copy_in(c, obj):
    for name in _names(type(obj)):
        setattr(c, name, getattr(obj, name))


@dataclass
class Regs:
    """struct kvm_regs: the general-purpose registers, RIP and RFLAGS."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    @classmethod
    def from_c(cls, c):
        return cls(*[getattr(c, name) for name in _names(cls)])

    def to_c(self, c=None):
        if c is None:  # cffi fills the struct from the dict in C: much faster than setattr
            return ffi.new("struct kvm_regs *", vars(self))
        _copy_in(c, self)
        return c

    def to_json(self):
        return {k: hex(v) for k, v in asdict(self).items()}


@dataclass
class Segment:
    """struct kvm_segment: one segment register, its hidden part included."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 (the uAPI's name)
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_c(cls, c):
        return cls(*[getattr(c, name) for name in _names(cls)])

    def to_c(self, c):
        _copy_in(c, self)
        c.padding = 0


@dataclass
class DTable:
    """struct kvm_dtable: GDTR or IDTR."""

    base: int = 0
    limit: int = 0

    @classmethod
    def from_c(cls, c):
        return cls(c.base, c.limit)

    def to_c(self, c):
        c.base, c.limit = self.base, self.limit


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class Sregs:
    """struct kvm_sregs: segment, descriptor-table and control registers, EFER, APIC base."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: list = field(default_factory=lambda: [0, 0, 0, 0])

    @classmethod
    def from_c(cls, c):
        s = cls()
        for name in SEGMENTS:
            setattr(s, name, Segment.from_c(getattr(c, name)))
        s.gdt, s.idt = DTable.from_c(c.gdt), DTable.from_c(c.idt)
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(s, name, getattr(c, name))
        s.interrupt_bitmap = list(c.interrupt_bitmap)
        return s

    def to_c(self, c=None):
        if c is None:  # one C-side initialisation from nested dicts (field names are the uAPI's)
            d = dict(vars(self))
            for name in SEGMENTS + ("gdt", "idt"):
                d[name] = vars(d[name])
            return ffi.new("struct kvm_sregs *", d)
        for name in SEGMENTS:
            getattr(self, name).to_c(getattr(c, name))
        self.gdt.to_c(c.gdt)
        self.idt.to_c(c.idt)
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(c, name, getattr(self, name))
        for i, v in enumerate(self.interrupt_bitmap):
            c.interrupt_bitmap[i] = v
        return c

    @property
    def cpl(self):
        return self.ss.dpl

    def to_json(self):
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, int):
                d[k] = hex(v)
        return d
