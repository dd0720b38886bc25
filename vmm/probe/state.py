"""Probe checks on save/restore of vCPU state (state_test, amx_test)."""
