"""Dataclasses for the fixed-layout vCPU register structs (kvm_regs, kvm_sregs).

Field names are the uAPI's; conversion to and from cdata goes through the
struct's own field list, so no offset is written here.
"""

from dataclasses import asdict, dataclass, field, fields

from ._bindings import ffi
from .records import Record

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


# Each struct is a dataclass that writes its __init__ out and takes __eq__/__repr__ from Record:
# `vmm run` imports these, and a generated dataclass costs its import a compile (vmm/records.py)
@dataclass(init=False, repr=False, eq=False)
class Regs(Record):
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

    def __init__(self, rax=0, rbx=0, rcx=0, rdx=0, rsi=0, rdi=0, rsp=0, rbp=0, r8=0, r9=0, r10=0, r11=0,
                 r12=0, r13=0, r14=0, r15=0, rip=0, rflags=0x2):
        self.rax, self.rbx, self.rcx, self.rdx, self.rsi, self.rdi, self.rsp, self.rbp = \
            rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp
        self.r8, self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15 = \
            r8, r9, r10, r11, r12, r13, r14, r15
        self.rip, self.rflags = rip, rflags

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


@dataclass(init=False, repr=False, eq=False)
class Segment(Record):
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

    def __init__(self, base=0, limit=0, selector=0, type=0, present=0, dpl=0, db=0, s=0, l=0,  # noqa: A002, E741
                 g=0, avl=0, unusable=0):
        self.base, self.limit, self.selector, self.type, self.present, self.dpl = \
            base, limit, selector, type, present, dpl
        self.db, self.s, self.l, self.g, self.avl, self.unusable = db, s, l, g, avl, unusable

    @classmethod
    def from_c(cls, c):
        return cls(*[getattr(c, name) for name in _names(cls)])

    def to_c(self, c):
        _copy_in(c, self)
        c.padding = 0


@dataclass(init=False, repr=False, eq=False)
class DTable(Record):
    """struct kvm_dtable: GDTR or IDTR."""

    base: int = 0
    limit: int = 0

    def __init__(self, base=0, limit=0):
        self.base, self.limit = base, limit

    @classmethod
    def from_c(cls, c):
        return cls(c.base, c.limit)

    def to_c(self, c):
        c.base, c.limit = self.base, self.limit


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(init=False, repr=False, eq=False)
class Sregs(Record):
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

    def __init__(self, cs=None, ds=None, es=None, fs=None, gs=None, ss=None, tr=None, ldt=None, gdt=None,
                 idt=None, cr0=0, cr2=0, cr3=0, cr4=0, cr8=0, efer=0, apic_base=0, interrupt_bitmap=None):
        """A field left None is a fresh default (a zero Segment or DTable, a zero bitmap)."""
        self.cs = Segment() if cs is None else cs
        self.ds = Segment() if ds is None else ds
        self.es = Segment() if es is None else es
        self.fs = Segment() if fs is None else fs
        self.gs = Segment() if gs is None else gs
        self.ss = Segment() if ss is None else ss
        self.tr = Segment() if tr is None else tr
        self.ldt = Segment() if ldt is None else ldt
        self.gdt = DTable() if gdt is None else gdt
        self.idt = DTable() if idt is None else idt
        self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer, self.apic_base = \
            cr0, cr2, cr3, cr4, cr8, efer, apic_base
        self.interrupt_bitmap = [0, 0, 0, 0] if interrupt_bitmap is None else interrupt_bitmap

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
