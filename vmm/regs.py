"""x86 register ids for KVM_GET_ONE_REG / KVM_SET_ONE_REG (Linux 6.18+).

An id is a 64-bit value laid out as in arch/x86/include/uapi/asm/kvm.h
(KVM_X86_REG_ID) and checked by KVM against its overlay struct
kvm_x86_reg_id in arch/x86/kvm/x86.c:

    bits 63..56  arch   KVM_REG_X86
    bits 55..52  size   log2 of the size in bytes; x86 accepts only u64
    bits 51..40  reserved (rsvd1, rsvd2); KVM rejects ids with any set
    bits 39..32  type   KVM_X86_REG_TYPE_MSR or KVM_X86_REG_TYPE_KVM
    bits 31..0   index  MSR number, or KVM-defined register number

This module is pure: no ioctls, so names and ids can be checked (and
typos reported) before any VM exists.
"""

from __future__ import annotations

import difflib
import errno as _errno
import re
from dataclasses import dataclass

KVM_REG_ARCH_MASK = 0xFF00000000000000  # mirrors uAPI KVM_REG_ARCH_MASK (linux/kvm.h)
KVM_REG_X86 = 0x2000000000000000  # mirrors uAPI KVM_REG_X86 (linux/kvm.h)
KVM_REG_SIZE_SHIFT = 52  # mirrors uAPI KVM_REG_SIZE_SHIFT (linux/kvm.h)
KVM_REG_SIZE_MASK = 0x00F0000000000000  # mirrors uAPI KVM_REG_SIZE_MASK (linux/kvm.h)
KVM_REG_SIZE_U64 = 0x0030000000000000  # mirrors uAPI KVM_REG_SIZE_U64 (linux/kvm.h)
KVM_X86_REG_TYPE_MSR = 2  # mirrors uAPI KVM_X86_REG_TYPE_MSR (asm/kvm.h, 6.18)
KVM_X86_REG_TYPE_KVM = 3  # mirrors uAPI KVM_X86_REG_TYPE_KVM (asm/kvm.h, 6.18)
KVM_REG_GUEST_SSP = 0  # mirrors uAPI KVM_REG_GUEST_SSP (asm/kvm.h, 6.18)

# Not in the uAPI header: the field positions of the kernel-private overlay.
_TYPE_SHIFT = 32
_TYPE_MASK = 0xFF << _TYPE_SHIFT
_INDEX_MASK = 0xFFFFFFFF
_RESERVED_MASK = 0x000FFF0000000000  # bits 51..40
_U64_MAX = (1 << 64) - 1

_TYPE_NAMES = {KVM_X86_REG_TYPE_MSR: "msr", KVM_X86_REG_TYPE_KVM: "kvm"}

# Arch values from linux/kvm.h, only to say which arch a wrong id was for.
_ARCH_NAMES = {
    0x0000000000000000: "GENERIC",
    0x1000000000000000: "PPC",
    0x2000000000000000: "X86",
    0x3000000000000000: "IA64",
    0x4000000000000000: "ARM",
    0x5000000000000000: "S390",
    0x6000000000000000: "ARM64",
    0x7000000000000000: "MIPS",
    0x8000000000000000: "RISCV",
    0x9000000000000000: "LOONGARCH",
}


class RegError(ValueError):
    """A register name, id, index or value that KVM would not accept."""


# MSR numbers: Intel SDM vol. 4 and the kernel's arch/x86/include/asm/msr-index.h;
# KVM paravirtual MSRs from arch/x86/include/uapi/asm/kvm_para.h.
# Keys drop the MSR_/IA32_ prefixes, which lookups accept and ignore.
MSRS: dict[str, int] = {
    "TSC": 0x10,
    "APIC_BASE": 0x1B,
    "FEATURE_CONTROL": 0x3A,
    "TSC_ADJUST": 0x3B,
    "SPEC_CTRL": 0x48,
    "PRED_CMD": 0x49,
    "ARCH_CAPABILITIES": 0x10A,
    "SYSENTER_CS": 0x174,
    "SYSENTER_ESP": 0x175,
    "SYSENTER_EIP": 0x176,
    "MCG_CAP": 0x179,
    "MCG_STATUS": 0x17A,
    "MCG_CTL": 0x17B,
    "MISC_ENABLE": 0x1A0,
    "XFD": 0x1C4,
    "XFD_ERR": 0x1C5,
    "DEBUGCTL": 0x1D9,
    "PAT": 0x277,
    "MTRR_DEF_TYPE": 0x2FF,
    "U_CET": 0x6A0,
    "S_CET": 0x6A2,
    "PL0_SSP": 0x6A4,
    "PL1_SSP": 0x6A5,
    "PL2_SSP": 0x6A6,
    "PL3_SSP": 0x6A7,
    "INT_SSP_TAB": 0x6A8,
    "TSC_DEADLINE": 0x6E0,
    "XSS": 0xDA0,
    "EFER": 0xC0000080,
    "STAR": 0xC0000081,
    "LSTAR": 0xC0000082,
    "CSTAR": 0xC0000083,
    "SYSCALL_MASK": 0xC0000084,
    "FS_BASE": 0xC0000100,
    "GS_BASE": 0xC0000101,
    "KERNEL_GS_BASE": 0xC0000102,
    "TSC_AUX": 0xC0000103,
    "KVM_WALL_CLOCK": 0x11,
    "KVM_SYSTEM_TIME": 0x12,
    "KVM_WALL_CLOCK_NEW": 0x4B564D00,
    "KVM_SYSTEM_TIME_NEW": 0x4B564D01,
    "KVM_ASYNC_PF_EN": 0x4B564D02,
    "KVM_STEAL_TIME": 0x4B564D03,
    "KVM_PV_EOI_EN": 0x4B564D04,
    "KVM_POLL_CONTROL": 0x4B564D05,
    "KVM_ASYNC_PF_INT": 0x4B564D06,
    "KVM_ASYNC_PF_ACK": 0x4B564D07,
    "KVM_MIGRATION_CONTROL": 0x4B564D08,
}

# Other spellings in use: kernel msr-index.h names, SDM and AMD APM names.
MSR_ALIASES: dict[str, str] = {
    "SFMASK": "SYSCALL_MASK",  # AMD APM
    "FMASK": "SYSCALL_MASK",  # Intel SDM IA32_FMASK
    "FEAT_CTL": "FEATURE_CONTROL",  # kernel MSR_IA32_FEAT_CTL
    "APICBASE": "APIC_BASE",  # kernel MSR_IA32_APICBASE
    "CR_PAT": "PAT",  # kernel MSR_IA32_CR_PAT
    "MTRRDEFTYPE": "MTRR_DEF_TYPE",  # kernel MSR_MTRRdefType
    "DEBUGCTLMSR": "DEBUGCTL",  # kernel MSR_IA32_DEBUGCTLMSR
    "TIME_STAMP_COUNTER": "TSC",  # Intel SDM IA32_TIME_STAMP_COUNTER
}

# KVM-defined registers (type KVM_X86_REG_TYPE_KVM); api.rst calls GUEST_SSP "SSP".
KVM_REGS: dict[str, int] = {"GUEST_SSP": KVM_REG_GUEST_SSP}
KVM_REG_ALIASES: dict[str, str] = {"SSP": "GUEST_SSP"}

_MSR_LOOKUP = {**MSRS, **{a: MSRS[c] for a, c in MSR_ALIASES.items()}}
_MSR_NAME_BY_INDEX = {i: n for n, i in MSRS.items()}
_KVM_LOOKUP = {**KVM_REGS, **{a: KVM_REGS[c] for a, c in KVM_REG_ALIASES.items()}}
_KVM_NAME_BY_INDEX = {i: n for n, i in KVM_REGS.items()}


def _check_int(value: object, what: str) -> int:
    # bool is an int subclass; True as a register index is always a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise RegError(f"{what} must be an int, got {type(value).__name__}")
    return value


def _check_u32(value: object, what: str) -> int:
    value = _check_int(value, what)
    if value < 0:
        raise RegError(f"{what} {value} is negative")
    if value > _INDEX_MASK:
        raise RegError(f"{what} {value:#x} does not fit in 32 bits")
    return value


def _check_u64(value: object, what: str) -> int:
    value = _check_int(value, what)
    if value < 0:
        raise RegError(f"{what} {value} is negative")
    if value > _U64_MAX:
        raise RegError(f"{what} {value:#x} does not fit in 64 bits")
    return value


def _check_arch(arch: int) -> None:
    if arch != KVM_REG_X86:
        name = _ARCH_NAMES.get(arch, "unknown arch")
        raise RegError(
            f"arch field is {name} ({arch:#018x}), not KVM_REG_X86 ({KVM_REG_X86:#018x})"
        )


@dataclass(frozen=True)
class RegId:
    """The fields of an x86 ONE_REG id; construction validates them."""

    arch: int  # the masked arch field, e.g. KVM_REG_X86
    size_bytes: int
    type: int  # KVM_X86_REG_TYPE_MSR or KVM_X86_REG_TYPE_KVM
    index: int

    def __post_init__(self) -> None:
        # Same order as KVM's own checks: arch, type, size.
        _check_arch(_check_int(self.arch, "arch"))
        _check_int(self.type, "type")
        if self.type not in _TYPE_NAMES:
            raise RegError(
                f"unknown register type {self.type} (expected {KVM_X86_REG_TYPE_MSR} "
                f"= KVM_X86_REG_TYPE_MSR or {KVM_X86_REG_TYPE_KVM} = KVM_X86_REG_TYPE_KVM)"
            )
        _check_int(self.size_bytes, "size_bytes")
        if self.size_bytes != 8:
            # linux/kvm.h names sizes KVM_REG_SIZE_U8 .. KVM_REG_SIZE_U2048.
            known = self.size_bytes in (1, 2, 4, 16, 32, 64, 128, 256)
            uapi = f" (KVM_REG_SIZE_U{8 * self.size_bytes})" if known else ""
            raise RegError(
                f"register size is {self.size_bytes} bytes{uapi}; "
                "x86 ONE_REG registers are KVM_REG_SIZE_U64 (8 bytes)"
            )
        _check_u32(self.index, "register index")

    @property
    def kind(self) -> str:
        """'msr' or 'kvm'."""
        return _TYPE_NAMES[self.type]

    def encode(self) -> int:
        size_field = self.size_bytes.bit_length() - 1  # log2; size_bytes is 8 here
        return (
            self.arch
            | (size_field << KVM_REG_SIZE_SHIFT)
            | (self.type << _TYPE_SHIFT)
            | self.index
        )


def msr(index: int) -> int:
    """The ONE_REG id of MSR `index` (KVM_X86_REG_MSR in the uAPI)."""
    index = _check_u32(index, "MSR index")
    return RegId(KVM_REG_X86, 8, KVM_X86_REG_TYPE_MSR, index).encode()


def kvm_reg(index: int) -> int:
    """The ONE_REG id of KVM-defined register `index` (KVM_X86_REG_KVM)."""
    index = _check_u32(index, "KVM register index")
    return RegId(KVM_REG_X86, 8, KVM_X86_REG_TYPE_KVM, index).encode()


def decode(reg_id: int) -> RegId:
    """Split and validate a 64-bit id; raises RegError where KVM would say EINVAL.

    Unknown KVM-defined indices are accepted: newer kernels may add some.
    """
    reg_id = _check_u64(reg_id, "register id")
    try:
        _check_arch(reg_id & KVM_REG_ARCH_MASK)
        reserved = reg_id & _RESERVED_MASK
        if reserved:
            raise RegError(f"reserved bits 51..40 must be zero, found {reserved:#018x}")
        return RegId(
            arch=reg_id & KVM_REG_ARCH_MASK,
            size_bytes=1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT),
            type=(reg_id & _TYPE_MASK) >> _TYPE_SHIFT,
            index=reg_id & _INDEX_MASK,
        )
    except RegError as e:
        raise RegError(f"register id {reg_id:#018x}: {e}") from None


def name_of(reg_id: int) -> str:
    """'MSR_EFER', 'GUEST_SSP', or 'MSR 0x...' / 'KVM_REG 0x...' when unnamed."""
    reg = decode(reg_id)
    if reg.type == KVM_X86_REG_TYPE_MSR:
        name = _MSR_NAME_BY_INDEX.get(reg.index)
        return f"MSR_{name}" if name else f"MSR {reg.index:#x}"
    name = _KVM_NAME_BY_INDEX.get(reg.index)
    return name if name else f"KVM_REG {reg.index:#x}"


def describe(reg_id: int) -> dict[str, str]:
    """A JSON-ready summary of a register id."""
    reg = decode(reg_id)
    return {
        "id": f"{reg_id:#018x}",
        "name": name_of(reg_id),
        "type": reg.kind,
        "index": f"{reg.index:#x}",
    }


_NUMBER = re.compile(
    r"(?P<sign>[+-]?)(?:0[xX](?P<hex>[0-9a-fA-F]+(?:_[0-9a-fA-F]+)*)|(?P<dec>[0-9]+(?:_[0-9]+)*))"
)
_PREFIXED = re.compile(r"(?P<kind>MSR|KVM_REG)\s+(?P<num>\S+)", re.IGNORECASE)


def _looks_numeric(text: str) -> bool:
    return bool(re.match(r"[+-]?[0-9]", text))


def _parse_uint(text: str, what: str) -> int:
    """Hex (0x...) or decimal, '_' separators allowed; never negative."""
    m = _NUMBER.fullmatch(text)
    if not m:
        raise RegError(f"{what} {text!r} is not a number (use hex with 0x, or decimal)")
    value = int(m["hex"], 16) if m["hex"] is not None else int(m["dec"], 10)
    if m["sign"] == "-" and value:
        raise RegError(f"{what} {text!r} is negative")
    return value


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else name


def _lookup_name(text: str) -> int | None:
    upper = text.upper()
    kvm = _strip_prefix(upper, "KVM_REG_")
    if kvm in _KVM_LOOKUP:
        return kvm_reg(_KVM_LOOKUP[kvm])
    bare = _strip_prefix(_strip_prefix(upper, "MSR_"), "IA32_")
    if bare in _MSR_LOOKUP:
        return msr(_MSR_LOOKUP[bare])
    return None


def _unknown_name(text: str) -> RegError:
    query = _strip_prefix(_strip_prefix(text.upper(), "MSR_"), "IA32_")
    candidates = list(_MSR_LOOKUP) + list(_KVM_LOOKUP)
    close = difflib.get_close_matches(query, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        "; expected an MSR or KVM register name, an MSR index like 0xc0000080, "
        "or a full register id like 0x20300002c0000080"
    )
    return RegError(f"unknown register {text!r}{hint}")


def parse_reg(text: str) -> int:
    """A register id from a name, an MSR index, 'MSR <n>', 'KVM_REG <n>', or a full id."""
    if not isinstance(text, str):
        raise RegError(f"register must be given as text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise RegError("empty register name")

    m = _PREFIXED.fullmatch(text)
    if m:
        index = _parse_uint(m["num"], "register index")
        return msr(index) if m["kind"].upper() == "MSR" else kvm_reg(index)

    if _looks_numeric(text):
        value = _parse_uint(text, "register")
        if value <= _INDEX_MASK:
            return msr(value)
        try:
            decode(value)
        except RegError as e:
            raise RegError(
                f"{text!r} is neither a 32-bit MSR index nor a valid register id ({e})"
            ) from None
        return value

    found = _lookup_name(text)
    if found is None:
        raise _unknown_name(text)
    return found


def parse_assignment(text: str) -> tuple[int, int]:
    """'NAME=VALUE' -> (register id, value); VALUE is hex (0x...) or decimal u64."""
    if not isinstance(text, str):
        raise RegError(f"assignment must be text, got {type(text).__name__}")
    name, sep, value_text = text.partition("=")
    name, value_text = name.strip(), value_text.strip()
    if not sep:
        raise RegError(f"expected NAME=VALUE, got {text!r}")
    if not name:
        raise RegError(f"missing register name before '=' in {text!r}")
    if not value_text:
        raise RegError(f"missing value after '=' in {text!r}")
    reg_id = parse_reg(name)
    value = _parse_uint(value_text, f"value for {name}")
    if value > _U64_MAX:
        raise RegError(f"value for {name} {value_text!r} does not fit in 64 bits")
    return reg_id, value


# --- access on a vCPU ------------------------------------------------------------------------------
# Duck-typed on vmm.vcpu.Vcpu (get_one_reg/set_one_reg/get_msrs/set_msrs), so this module keeps
# importing without the compiled bindings.

MSR_EFER = 0xC0000080
_KVM_CAP_ONE_REG = 70  # checked against the header in tests/test_regs.py


class RegisterAccess:
    """Get/set registers by id on one vCPU: through KVM_GET/SET_ONE_REG when this kernel has x86
    ONE_REG (KVM_CAP_ONE_REG and a probe read of EFER by id succeed), else through
    KVM_GET/SET_MSRS for MSR ids. The caller does not care which; `via` says which was used."""

    def __init__(self, vcpu, prefer_one_reg=True):
        self.vcpu = vcpu
        self.one_reg = prefer_one_reg and self.probe_one_reg(vcpu)
        self.via = "ONE_REG" if self.one_reg else "KVM_GET/SET_MSRS"

    @staticmethod
    def probe_one_reg(vcpu):
        from .errors import KvmError
        if not vcpu.vm.kvm.check_extension(_KVM_CAP_ONE_REG):
            return False
        try:
            vcpu.get_one_reg(msr(MSR_EFER))
        except KvmError:
            return False  # x86 ONE_REG arrived in 6.18; older kernels answer EINVAL/ENOENT
        return True

    def _explain(self, e, reg_id):
        """Rewrite a KVM error on a register into one that says which register and why."""
        from .errors import KvmError
        rid = decode(reg_id)
        name = name_of(reg_id)
        if rid.kind == "kvm" and rid.index == KVM_REG_GUEST_SSP:
            cpuid = getattr(self.vcpu, "cpuid", None)
            shstk = cpuid is not None and cpuid.has("SHSTK")
            why = ("KVM exposes GUEST_SSP only to a vCPU whose guest CPUID has SHSTK (CET shadow stacks); "
                   + ("this guest's CPUID has SHSTK, so this KVM/host lacks CET support"
                      if shstk else "this guest's CPUID has no SHSTK"))
        elif rid.kind == "msr":
            why = (f"KVM does not let this vCPU access {name} (unknown to KVM, or its feature is absent "
                   "from the guest CPUID)")
        else:
            why = f"KVM does not know {name}"
        return KvmError(e.ioctl, e.errno, hint=why, detail=name)

    def _no_one_reg(self, reg_id, ioctl):
        from .errors import KvmError
        return KvmError(ioctl, _errno.ENOTTY, hint="this kernel has no x86 ONE_REG (Linux 6.18+), and "
                        f"{name_of(reg_id)} has no other interface", detail=name_of(reg_id))

    def get(self, reg_id):
        from .errors import KvmError
        rid = decode(reg_id)
        if not self.one_reg and rid.kind != "msr":
            raise self._no_one_reg(reg_id, "KVM_GET_ONE_REG")
        try:
            if self.one_reg:
                return self.vcpu.get_one_reg(reg_id)
            return self.vcpu.get_msrs([rid.index])[rid.index]
        except KvmError as e:
            raise self._explain(e, reg_id) from None

    def set(self, reg_id, value):
        from .errors import KvmError
        rid = decode(reg_id)
        value = _check_u64(value, "value")
        if not self.one_reg and rid.kind != "msr":
            raise self._no_one_reg(reg_id, "KVM_SET_ONE_REG")
        try:
            if self.one_reg:
                return self.vcpu.set_one_reg(reg_id, value)
            self.vcpu.set_msrs({rid.index: value})
        except KvmError as e:
            try:  # a register this vCPU can read refused the value, not the access
                self.get(reg_id)
            except KvmError:
                raise self._explain(e, reg_id) from None
            raise KvmError(e.ioctl, e.errno, detail=name_of(reg_id),
                           hint=f"KVM refused the value 0x{value:x} for {name_of(reg_id)}, which this vCPU "
                           "can access (reserved bits set, or a value its guest CPUID does not allow)") from None

    def readable_msrs(self, indices):
        """{index: value} for the MSRs of `indices` this vCPU can read; the rest are left out."""
        from .errors import KvmError
        out = {}
        for i in indices:
            try:
                out[i] = self.get(msr(i))
            except KvmError:
                pass
        return out
