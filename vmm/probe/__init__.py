"""`vmm probe`: behaviour checks against this host's KVM, and the versioned report they make.

Each check sets something up, makes one call, and records what the kernel answered (a value or an
errno) next to what a current upstream kernel answers, with a one-line verdict. The report also
carries the host fingerprint (kernel, KVM capabilities, KVM_GET_SUPPORTED_CPUID as JSON and as a
dump, the XSAVE layout, XSAVE permissions, MSR lists), so `vmm compat` and `vmm baseline` can use a
report written on another host.

Layout: `core` (records, context, registry, the "not in this kernel" and PVM reasons), one module
per group of checks (`xsave`, `amx`, `cpuid`, `msr`, `state`, `io`; a check's `selftest` names the
Linux KVM selftest whose assertion it makes), `run` (this process and fresh processes), `report`
(host fingerprint, summary per group, text form) and `schema` (the report's versioned schemas and
their validator).

Process hygiene: XSAVE permissions (arch_prctl) belong to the process, a permission request cannot
be undone, and the first vCPU of a process locks them. The checks that depend on or change them
therefore run in fresh processes (`python -m vmm.probe --check NAME ...`: fork and exec, so the
child starts with the kernel's default permissions, not with a copy of the caller's), one process
per group, started first and run in parallel with the other checks. The caller's permissions are
never touched. Checks known to be dangerous on old kernels are skipped there, with the reason.
"""

# the check modules register their checks on import
from . import amx, cpuid, io, msr, state, xsave  # noqa: F401
from .core import (CHECKS, GROUPS, STATUSES, Context, ProbeError, check_names, get_check, kernel_version, select,
                   sort_checks, xstate_bv)
from .report import all_as_upstream, amx_from_checks, format_report, format_summary, host_info, make_report
from .run import run_check, run_checks
from .schema import (SCHEMA_ID, ReportError, check_report, load_report, load_schema,
                     validate)

sort_checks()

__all__ = ["CHECKS", "GROUPS", "STATUSES", "Context", "ProbeError", "ReportError",
           "SCHEMA_ID", "all_as_upstream", "amx_from_checks", "check_names", "check_report", "format_report",
           "format_summary", "get_check", "host_info", "kernel_version", "load_report", "load_schema",
           "make_report", "run_check", "run_checks", "select", "validate", "xstate_bv"]
