"""Register-level differences between two vCPU states, and the guest memory extents that differ
between two VMs. Pure over its inputs (memory is read through the callables given).

Per vCPU, in this order: every register class of vmm.regfile (GPRs, segments, descriptor tables,
control registers, debug registers, XCRs, MSRs by name, LAPIC registers, MP state, events), the XSAVE
area through vmm.xsave.XsaveArea.diff (XSTATE_BV, XCOMP_BV, then each register by its architectural
value, so buffers of different layouts compare by register), and the CPUID table field by field in
the field model of vmm.cpuid_model (feature flags by name, numbers by their bits and meaning).
"""

from dataclasses import dataclass

PAGE = 4096


@dataclass
class Difference:
    cls: str      # a vmm.regfile class, or "cpuid"
    name: str
    a: object     # int, bytes, bool, or None when only the other side has it
    b: object
    size: int = 8


def diff_vcpus(rf_a, rf_b):
    """[Difference] between two vmm.regfile.RegisterFile (XSAVE composites are left out: their parts
    are compared)."""
    out = []
    regs_a = {r.name: r for r in rf_a.registers() if r.cls != "xsave"}
    regs_b = {r.name: r for r in rf_b.registers() if r.cls != "xsave"}
    for name in list(regs_a) + [n for n in regs_b if n not in regs_a]:
        ra, rb = regs_a.get(name), regs_b.get(name)
        va = rf_a.get(name) if ra else None
        vb = rf_b.get(name) if rb else None
        if va != vb:
            r = ra or rb
            out.append(Difference(r.cls, name, va, vb, r.size))
    out += _xsave(rf_a, rf_b)
    out += diff_cpuid(rf_a.state.cpuid, rf_b.state.cpuid)
    return out


def _xsave(rf_a, rf_b):
    a, b = rf_a.area, rf_b.area
    if a is None or b is None:
        if (a is None) != (b is None) or rf_a.state.xsave != rf_b.state.xsave:
            return [Difference("xsave", "XSAVE", rf_a.xsave_problem or "decoded",
                               rf_b.xsave_problem or "decoded", 0)]
        return []
    out = []
    for name, va, vb in a.diff(b):
        size = (a.register_size(name) if name in a.register_names() else
                b.register_size(name) if name in b.register_names() else 8)
        out.append(Difference("xsave", name.upper(), va, vb, size))
    return out


def diff_cpuid(ta, tb):
    """Each CPUID field that differs, in the field model of vmm.cpuid_model: a flag bit by its
    feature name (or CPUID.(leaf,sub).REG[bit]) as yes/no, a number by its bits and name; a
    register only one table has as a whole."""
    from .cpuid_model import FLAGS, FLAGS_INVERTED, UNKNOWN, bit_name, fields_of, where
    out = []
    ea = {(e.function, e.index if e.indexed else 0): e for e in ta}
    eb = {(e.function, e.index if e.indexed else 0): e for e in tb}
    for leaf, sub in sorted(set(ea) | set(eb)):
        x, y = ea.get((leaf, sub)), eb.get((leaf, sub))
        for reg in ("eax", "ebx", "ecx", "edx"):
            va = x.reg(reg) if x else None
            vb = y.reg(reg) if y else None
            if va == vb:
                continue
            if va is None or vb is None:
                out.append(Difference("cpuid", f"CPUID.({leaf:#x},{sub}).{reg.upper()}", va, vb, 4))
                continue
            for f in fields_of(leaf, sub, reg):
                if f.value(va) == f.value(vb):
                    continue
                if f.kind in (FLAGS, FLAGS_INVERTED, UNKNOWN):
                    for bit in range(f.lo, f.hi + 1):
                        a, b = va >> bit & 1, vb >> bit & 1
                        if a != b:
                            out.append(Difference("cpuid", bit_name(leaf, sub, reg, bit)
                                                  or where(leaf, sub, reg, bit), bool(a), bool(b), 0))
                else:
                    out.append(Difference("cpuid", f"{where(leaf, sub, reg, f.lo, f.hi)} {f.name}".rstrip(),
                                          f.value(va), f.value(vb), 4))
    return out


def memory_reader(slots):
    """read(gpa, n) over [(gpa, size, fetch)] where fetch(offset, n) returns the slot's bytes; guest
    addresses no slot backs read as zero."""
    def read(gpa, n):
        out = bytearray(n)
        for base, size, fetch in slots:
            lo, hi = max(gpa, base), min(gpa + n, base + size)
            if lo < hi:
                out[lo - gpa:hi - gpa] = fetch(lo - base, hi - lo)
        return bytes(out)
    return read


def diff_memory(extents_a, extents_b, read_a, read_b, chunk=1 << 20):
    """Guest-physical extents whose contents differ: [(gpa, length)], page granular.

    extents_*: [(gpa, length)] where a side may hold non-zero data (elsewhere it reads as zero, so
    pages outside every extent of both sides are skipped); read_*(gpa, n) returns a side's bytes
    (memory_reader). Memory one side has and the other lacks differs where it is not zero."""
    pages = set()
    for g, n in list(extents_a) + list(extents_b):
        pages.update(range(g // PAGE, (g + n + PAGE - 1) // PAGE))
    runs = []
    for start, count in _runs(sorted(pages)):
        off, end = start * PAGE, (start + count) * PAGE
        while off < end:
            n = min(chunk, end - off)
            da, db = read_a(off, n), read_b(off, n)
            if da != db:
                runs += [(off + p, PAGE) for p in range(0, n, PAGE) if da[p:p + PAGE] != db[p:p + PAGE]]
            off += n
    return _coalesce(runs)


def _runs(pages):
    out = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def _coalesce(runs):
    out = []
    for g, n in runs:
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((g, n))
    return out
