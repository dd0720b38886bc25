"""Whether a guest's TSC rate can be given on a host (pure; no ioctls).

KVM_SET_TSC_KHZ takes a rate within tsc_tolerance_ppm (default 250 ppm) of the host's TSC without
scaling, so on hosts without TSC scaling (KVM_CAP_TSC_CONTROL = 0) such a rate is accepted as is
(arch/x86/kvm/x86.c, kvm_set_tsc_khz; QEMU and KubeVirt use the same tolerance for migration).
Beyond it, only hardware TSC scaling (KVM_CAP_TSC_CONTROL) gives the guest its rate; KVM would
accept a faster rate without scaling by "catch-up" (the TSC adjusted in jumps), which vmm does not
treat as the same rate.
"""

TSC_TOLERANCE_PPM = 250


def within_tolerance(guest_khz, host_khz, ppm=TSC_TOLERANCE_PPM):
    """`guest_khz` (kHz) lies within `ppm` parts per million of `host_khz`, bounds included, with the
    kernel's integer rounding (adjust_tsc_khz: khz * (1e6 +/- ppm) / 1e6)."""
    lo = host_khz * (1_000_000 - ppm) // 1_000_000
    hi = host_khz * (1_000_000 + ppm) // 1_000_000
    return lo <= guest_khz <= hi


def rate_problem(guest_khz, host_khz, tsc_control):
    """None when a guest that ran with a `guest_khz` TSC can be given that rate on a host whose TSC
    runs at `host_khz` (kHz; None: unknown) with KVM_CAP_TSC_CONTROL `tsc_control` (None: unknown);
    else one line saying why not. A rate of 0 means the state carries none."""
    if not guest_khz or tsc_control or host_khz is None:
        return None  # no rate carried, scaling available, or nothing known to compare with
    if within_tolerance(guest_khz, host_khz):
        return None
    ppm = (guest_khz - host_khz) * 1_000_000 / host_khz
    return (f"the guest ran with a {guest_khz} kHz TSC, the host's is {host_khz} kHz ({ppm:+.0f} ppm, beyond "
            f"KVM's {TSC_TOLERANCE_PPM} ppm tolerance) and KVM cannot scale it there (KVM_CAP_TSC_CONTROL 0)")
