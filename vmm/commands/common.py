"""Helpers shared by the CLI commands: booting a guest, running it to a SYNC or to its end."""

import functools
import json
import os
import sys
import time

import click

from .. import kvm as kvm_mod
from ..errors import VmmError

EXIT_OK, EXIT_GUEST, EXIT_ERROR = 0, 1, 2


def _emit(obj):
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def handle_errors(fn):
    """Turn the project's errors (and bad input) into one clear line on stderr, exit 2."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_ERROR)
        except (VmmError, ValueError, OSError) as e:
            click.echo(f"vmm: error: {e}", err=True)
            sys.exit(EXIT_ERROR)
    return wrapper


device_option = click.option("--device", default=kvm_mod.DEFAULT_DEVICE, show_default=True,
                             help="KVM device node.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
timeout_option = click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=86400), default=10.0,
                              show_default=True, help="Wall-clock limit for the guest, seconds.")
amx_option = click.option("--amx", is_flag=True,
                          help="Expose AMX to the guest (requests the arch_prctl guest permission first).")



class GuestArg(click.ParamType):
    """An unsigned 64-bit guest argument: decimal or 0x-prefixed hex."""
    name = "u64"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            v = int(value, 0)
        except ValueError:
            self.fail(f"{value!r} is not a number (decimal or 0x hex)", param, ctx)
        if not 0 <= v < 1 << 64:
            self.fail(f"{value} does not fit in an unsigned 64-bit argument", param, ctx)
        return v


def load_cpu(cpu_file):
    if not cpu_file:
        return None
    from ..cpuid import CpuidTable
    try:
        with open(cpu_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise VmmError(f"{cpu_file}: not a CPUID JSON file ({e})") from None
    if isinstance(data, dict) and "cpuid" in data and "entries" not in data:
        data = data["cpuid"]  # a baseline or probe file carries the table under "cpuid"
    return CpuidTable.from_json(data)


def console_echo(as_json):
    if as_json:
        return None

    def echo(b):
        sys.stdout.write(b.decode("utf-8", "replace"))
        sys.stdout.flush()
    return echo


def run_to_sync(m, n=1, timeout=10.0, vcpu=0):
    """Run vCPU `vcpu` until its n-th SYNC (1-based); any other ending is an error."""
    from ..guest.runner import Sync
    if n < 1:
        raise VmmError(f"SYNC numbers start at 1, not {n}")
    deadline = time.monotonic() + timeout
    for i in range(n):
        ev = m.run(timeout=max(deadline - time.monotonic(), 1e-3), vcpu=vcpu)
        if not isinstance(ev, Sync):
            raise VmmError(f"guest {m.image.name!r} ended with '{ev}' before reaching SYNC {n} "
                           f"(it reached {i})")
    return ev


def run_to_end(m, timeout=10.0, as_json=False, vcpu=0):
    """Continue until the guest ends; SYNCs are echoed (text mode) and collected."""
    from ..guest.runner import Sync
    deadline = time.monotonic() + timeout
    syncs = []
    while True:
        ev = m.run(timeout=max(deadline - time.monotonic(), 1e-3), vcpu=vcpu)
        if not isinstance(ev, Sync):
            return ev, syncs
        syncs.append(ev.value)
        if not as_json:
            click.echo(str(ev))
