"""vmm.tsc: KVM's TSC rate tolerance (arch/x86/kvm/x86.c kvm_set_tsc_khz, tsc_tolerance_ppm = 250)."""

from vmm.tsc import TSC_TOLERANCE_PPM, rate_problem, within_tolerance


def test_the_bounds_follow_the_kernels_integer_rounding():
    host = 2_994_374  # kHz, as KVM_GET_TSC_KHZ reports a 3 GHz-class TSC
    lo, hi = host * (10**6 - 250) // 10**6, host * (10**6 + 250) // 10**6
    assert (lo, hi) == (2_993_625, 2_995_122)
    assert within_tolerance(lo, host) and within_tolerance(hi, host)
    assert not within_tolerance(lo - 1, host) and not within_tolerance(hi + 1, host)
    assert TSC_TOLERANCE_PPM == 250


def test_scaling_or_no_rate_makes_any_rate_fine():
    assert rate_problem(0, 3_000_000, 0) is None            # the state carries no rate
    assert rate_problem(4_000_000, 3_000_000, 1) is None    # KVM_CAP_TSC_CONTROL: scaled
    assert rate_problem(4_000_000, None, 0) is None         # the host's rate is unknown: not judged here
    assert rate_problem(3_000_600, 3_000_000, 0) is None    # +200 ppm
    why = rate_problem(3_003_000, 3_000_000, 0)
    assert "+1000 ppm" in why and "KVM_CAP_TSC_CONTROL 0" in why
    assert "-1000 ppm" in rate_problem(2_997_000, 3_000_000, 0)
