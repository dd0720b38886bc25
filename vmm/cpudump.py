"""Reading CPUID dump files, whatever tool wrote them; the format is told by the content.

Formats read (each is a table of logical CPU 0; a file holding several CPUs gives CPU 0 and says so):
  * ``aida64``: AIDA64/InstLatx64 lines, ``CPUID <leaf>: <eax>-<ebx>-<ecx>-<edx> [SL <sub>] [...]``,
    as `vmm cpuid` also prints them. InstLatx64 files with several CPUs separate them with
    ``CPU#<n>`` lines.
  * ``cpuid-r``: ``cpuid -r`` / ``cpuid -r -1`` output of the `cpuid` tool (Debian package cpuid):
    ``CPU <n>:`` (or ``CPU:``) then ``   0x<leaf> 0x<sub>: eax=0x... ebx=0x... ecx=0x... edx=0x...``.
  * ``json``: vmm's CPUID JSON (`vmm cpuid --json`, a snapshot's or baseline's ``cpuid`` object).
  * ``probe-report``: a `vmm probe` report; its ``host.supported_cpuid`` (KVM_GET_SUPPORTED_CPUID).

Every read goes through vmm.files (a regular file, at most MAX_DUMP_BYTES): an endless or huge input
such as /dev/zero is refused with that reason, not read into memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import files
from .cpuid import INDEXED_LEAVES, REGISTERS, SIGNIFICANT_INDEX, CpuidEntry, CpuidError, CpuidTable

__all__ = ["MAX_DUMP_BYTES", "FORMATS", "CpuidDump", "read_cpuid_file", "parse_cpuid_text"]

# A full `cpuid -r` of a 512-thread host is about 2.5 MB; a 16 MiB bound leaves room and still
# refuses endless inputs quickly.
MAX_DUMP_BYTES = 16 << 20

FORMATS = {
    "aida64": "AIDA64/InstLatx64 lines (CPUID <leaf>: eax-ebx-ecx-edx [SL n])",
    "cpuid-r": "`cpuid -r` output (all CPUs or -1)",
    "json": "vmm CPUID JSON (vmm cpuid --json)",
    "probe-report": "a vmm probe report",
}


def _accepted():
    return "accepted formats: " + "; ".join(FORMATS.values())


@dataclass
class CpuidDump:
    """A CPUID table read from a file: which format it was, and what the reader had to decide."""

    table: CpuidTable
    format: str  # a key of FORMATS
    source: str
    notes: list = field(default_factory=list)  # e.g. "4 CPUs in the file: CPU 0 is used"


def read_cpuid_file(path, limit=MAX_DUMP_BYTES):
    """Read a CPUID dump of any accepted format (see the module docstring); CpuidError names the
    file, the line and the formats accepted when it is none of them, or why the file cannot be
    read (vmm.files: a regular, non-empty file of at most `limit` bytes)."""
    try:
        raw = files.read_bytes(path, "CPUID dump", limit)
    except files.FileError as e:
        raise CpuidError(str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if b"\0" in raw:
            raise CpuidError(f"{path}: binary data, not a CPUID dump ({_accepted()})") from None
        try:  # a dump with a brand string in a legacy code page
            return parse_cpuid_text(raw.decode("latin-1"), str(path))
        except CpuidError:  # not that: say what the README says, the first byte that is not UTF-8
            try:
                files.decode_text(raw, str(path), "CPUID dump")
            except files.FileError as e:
                raise CpuidError(f"{e} ({_accepted()})") from None
            raise
    return parse_cpuid_text(text, str(path))


_CPUID_R_HEAD = re.compile(r"^CPU(?:\s+(?P<n>\d+))?:\s*$")
_CPUID_R_LINE = re.compile(
    r"^0x(?P<leaf>[0-9a-fA-F]{1,8})\s+0x(?P<sub>[0-9a-fA-F]{1,8}):\s*"
    r"eax=0x(?P<eax>[0-9a-fA-F]{1,8})\s+ebx=0x(?P<ebx>[0-9a-fA-F]{1,8})\s+"
    r"ecx=0x(?P<ecx>[0-9a-fA-F]{1,8})\s+edx=0x(?P<edx>[0-9a-fA-F]{1,8})\s*$")
_AIDA_CPU = re.compile(r"^CPU\s*#\s*(?P<n>\d+)\b")


def _first_content_line(lines):
    for n, raw in enumerate(lines, 1):
        s = raw.strip()
        if s and not s.startswith("#"):
            return n, s
    return None, None


def parse_cpuid_text(text, source="<text>"):
    """A CpuidDump from the text of a dump file (format detected from the content)."""
    lines = text.splitlines()
    n, first = _first_content_line(lines)
    if first is None:
        raise CpuidError(f"{source}: empty: no CPUID data ({_accepted()})")
    if first.startswith(("{", "[")):
        return _parse_json(text, source)
    if _CPUID_R_HEAD.match(first) or _CPUID_R_LINE.match(first):
        return _parse_cpuid_r(lines, source)
    if first.upper().startswith("CPUID") or _AIDA_CPU.match(first):
        return _parse_aida64(lines, source)
    raise CpuidError(f"{source}:{n}: not a CPUID dump line: {first[:80]!r} ({_accepted()})")


def _parse_aida64(lines, source):
    cpus, keep, out = [], True, []
    for n, raw in enumerate(lines, 1):
        s = raw.strip()
        m = _AIDA_CPU.match(s)
        if m:
            cpus.append(int(m["n"]))
            keep = len(cpus) == 1
            continue
        if keep:
            out.append(raw)
        else:
            out.append("")  # keep line numbers right in errors
    notes = []
    if len(cpus) > 1:
        notes.append(f"{len(cpus)} CPUs in the file: the first, CPU #{cpus[0]}, is used")
    # in AIDA64 files the header/footer may carry free text; CPUID lines are what counts
    try:
        table = CpuidTable.from_dump("\n".join(out) + "\n")
    except CpuidError as e:
        msg = str(e).replace("<text>", source, 1)
        raise CpuidError(f"{msg} ({_accepted()})") from None
    return CpuidDump(table, "aida64", source, notes)


def _parse_cpuid_r(lines, source):
    cpus = []  # CPU numbers in file order
    rows = []  # (lineno, leaf, sub, regs) of the first CPU
    current = None
    for n, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        h = _CPUID_R_HEAD.match(s)
        if h:
            current = int(h["n"]) if h["n"] is not None else 0
            cpus.append(current)
            continue
        m = _CPUID_R_LINE.match(s)
        if m is None:
            raise CpuidError(f"{source}:{n}: not a `cpuid -r` line: {raw[:80]!r} ({_accepted()})")
        if len(cpus) <= 1:
            rows.append((n, int(m["leaf"], 16), int(m["sub"], 16),
                         tuple(int(m[r], 16) for r in REGISTERS)))
    # `cpuid -r` prints a sub-leaf column for every leaf: a leaf is indexed when KVM marks it so
    # (INDEXED_LEAVES) or the file shows it with more than one sub-leaf
    subs = {}
    for _, leaf, sub, _ in rows:
        subs.setdefault(leaf, set()).add(sub)
    table = CpuidTable()
    for n, leaf, sub, regs in rows:
        indexed = leaf in INDEXED_LEAVES or len(subs[leaf]) > 1 or sub != 0
        try:
            table.put(CpuidEntry(leaf, sub, SIGNIFICANT_INDEX if indexed else 0, *regs), replace=False)
        except CpuidError as e:
            raise CpuidError(f"{source}:{n}: {e}") from None
    if not len(table):
        raise CpuidError(f"{source}: `cpuid -r` output without CPUID lines ({_accepted()})")
    notes = []
    if len(cpus) > 1:
        notes.append(f"{len(cpus)} CPUs in the file: the first, CPU {cpus[0]}, is used")
    return CpuidDump(table, "cpuid-r", source, notes)


def _parse_json(text, source):
    try:
        data = files.parse_json(text)
    except ValueError as e:
        what = "truncated JSON" if not text.rstrip().endswith(("}", "]")) else "not valid JSON"
        raise CpuidError(f"{source}:{e.lineno}: {what}: {e.msg} ({_accepted()})") from None
    fmt = "json"
    if isinstance(data, dict) and isinstance(data.get("schema"), str) \
            and data["schema"].startswith("vmm-probe-report/"):
        host = data.get("host")
        if not isinstance(host, dict) or not isinstance(host.get("supported_cpuid"), dict):
            raise CpuidError(f"{source}: a probe report without host.supported_cpuid")
        data, fmt = host["supported_cpuid"], "probe-report"
    elif isinstance(data, dict) and "entries" not in data and isinstance(data.get("cpuid"), dict):
        data = data["cpuid"]  # a baseline or snapshot-like file carries the table under "cpuid"
    try:
        table = CpuidTable.from_json(data)
    except CpuidError as e:
        raise CpuidError(f"{source}: {e} ({_accepted()})") from None
    return CpuidDump(table, fmt, source)
