"""Helpers shared by the CLI commands: booting a guest, running it to a SYNC or to its end."""

import errno
import functools
import os
import sys
import time

import click

from ..errors import VmmError

# The exit status scheme, the same for every command (README "Exit status"; `vmm --help`).
EXIT_OK = 0           # success; the guest reported DONE; the verdict is yes
EXIT_GUEST = 1        # the guest failed, faulted or ended otherwise; the verdict is no
EXIT_USAGE = 2        # bad usage or unusable input (options, files, guest names, XCR0 masks)
EXIT_TIMEOUT = 3      # the guest did not end (or reach its SYNC) within --timeout
EXIT_HOST = 4         # KVM or the host failed: an ioctl, /dev/kvm, memory
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): the guest was stopped; where is reported
EXIT_PIPE = 141       # the reader of standard output went away (`| head`): ends quietly
EXIT_ERROR = EXIT_USAGE  # older name

EXIT_STATUS_HELP = ("Exit status: 0 success (guest DONE, verdict yes); 1 guest failed or verdict no; "
                    "2 usage or input error; 3 timeout; 4 KVM or host error; 130 interrupted; "
                    "141 output pipe closed.")


def _emit(obj, err=False):
    """`obj` as indented JSON on standard output (`err`: standard error, when stdout carries a file)."""
    import json  # on use: `vmm run` without --json never needs it (cold start)
    click.echo(json.dumps(obj, indent=2, sort_keys=False), err=err)


class GuestEnded(VmmError):
    """The guest ended (or timed out) before the point a command needed; `event` tells how."""

    def __init__(self, msg, event):
        super().__init__(msg)
        self.event = event


def exit_for_event(ev):
    """The exit status for how a guest ended: DONE 0, timeout 3, anything else 1."""
    from ..guest.runner import Done, Timeout
    if isinstance(ev, Done):
        return EXIT_OK
    return EXIT_TIMEOUT if isinstance(ev, Timeout) else EXIT_GUEST


def classify(e):
    """(exit status, kind, errno name or None) for an exception that ends a command."""
    from ..errors import KvmError, errno_name
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted", None
    if isinstance(e, click.exceptions.UsageError):
        return EXIT_USAGE, "usage", None
    if isinstance(e, KvmError):
        return EXIT_HOST, "kvm", e.errno_name
    if getattr(e, "kind", None) == "host":  # an error class that names a limit of the host
        return EXIT_HOST, "host", None
    if isinstance(e, GuestEnded):  # the command could not do its job: never 0, even for a DONE ending
        from ..guest.runner import Timeout
        if isinstance(e.event, Timeout):
            return EXIT_TIMEOUT, "timeout", None
        return EXIT_GUEST, "guest", None
    err = getattr(e, "errno", None)
    name = errno_name(err) if isinstance(err, int) else None
    if isinstance(e, MemoryError):
        return EXIT_HOST, "host", "ENOMEM"
    if isinstance(e, OSError) and err in (errno.ENOMEM, errno.EIO, errno.EMFILE, errno.ENFILE):
        return EXIT_HOST, "host", name
    return EXIT_USAGE, "input", name  # VmmError, ValueError, OSError about a path


def message_of(e):
    """One line for an exception (what str() says, or its type for an empty one)."""
    if isinstance(e, KeyboardInterrupt):
        where = getattr(e, "where", None)
        return f"interrupted{': ' + where if where else ''}"
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + str(e) if str(e) else ''}"
    if isinstance(e, click.exceptions.UsageError):
        cmd = e.ctx.command_path if e.ctx else "vmm"
        return f"{e.format_message()} (see `{cmd} --help`)"
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, VmmError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {e.strerror or text}"
    return text


def quiet_pipe():
    """stdout's reader went away: send what is left to /dev/null so the exit flush stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass


def fail(e, as_json=False):
    """Report exception `e` (one line on stderr; with --json also a JSON object on stdout) and exit
    with its status from the scheme."""
    if isinstance(e, BrokenPipeError):
        quiet_pipe()
        sys.exit(EXIT_PIPE)
    code, kind, err = classify(e)
    msg = message_of(e)
    try:
        if as_json:
            _emit({"error": msg, "kind": kind, "errno": err, "exit_status": code})
        click.echo(f"vmm: {'error: ' if code != EXIT_INTERRUPTED else ''}{msg}", err=True)
    except BrokenPipeError:
        quiet_pipe()
    sys.exit(code)


def handle_errors(fn):
    """Turn the project's errors, bad input, SIGINT and a closed stdout into the exit status scheme:
    one line on stderr (and a JSON object on stdout with --json)."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (VmmError, ValueError, OSError, MemoryError, KeyboardInterrupt) as e:
            fail(e, kw.get("as_json", False))
    return wrapper


def wants_json(argv):
    """Whether a command line asks for --json (for errors found before the command runs)."""
    return "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv


def run_main(group, argv=None):
    """Run the click group with the scheme applied to what click itself reports: usage errors are
    one line (exit 2), Ctrl-C exits 130, a closed stdout exits quietly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = group.main(args=argv, prog_name="vmm", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt into Abort
        fail(e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else KeyboardInterrupt(),
             wants_json(argv))
    except click.exceptions.ClickException as e:
        fail(e, wants_json(argv))
    except (KeyboardInterrupt, BrokenPipeError) as e:
        fail(e, wants_json(argv))
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        fail(BrokenPipeError())
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


# vmm.kvm.DEFAULT_DEVICE (tests/test_cli.py), written out: importing vmm.kvm here would load the cffi
# bindings (and ctypes, for ioctl-opt) before every command, --help and --version too
DEFAULT_DEVICE = "/dev/kvm"
device_option = click.option("--device", default=DEFAULT_DEVICE, show_default=True,
                             help="KVM device node.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
class Seconds(click.FloatRange):
    """A bounded float of seconds; NaN (which every range comparison lets through) is refused."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if v != v:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return v


timeout_option = click.option("--timeout", type=Seconds(min=0, min_open=True, max=86400), default=10.0,
                              show_default=True, help="Wall-clock limit for the guest, seconds.")
MAX_MEMORY_MIB = 16 << 10  # the runtime's page tables map at most 16 GiB (guest/runtime.py MAX_PDS)
memory_option = click.option("--memory", "memory_mib", type=click.IntRange(4, MAX_MEMORY_MIB), default=4,
                             show_default=True, help=f"Guest RAM in MiB (4 to {MAX_MEMORY_MIB}).")
at_sync_option = click.option("--at-sync", "at_sync", type=click.IntRange(1, 1 << 31), default=1,
                              show_default=True, help="Act at the guest's N-th SYNC.")
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


def progress_bar(label, min_bytes=64 << 20):
    """A progress factory for long snapshot I/O (vmm.snapshot's `progress`): click's progress bar on
    stderr when stderr is a terminal and at least `min_bytes` move; None otherwise."""
    if not sys.stderr.isatty():
        return None

    def make(total):
        if total < min_bytes:
            return None
        return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False,
                                 show_percent=True, show_eta=True)
    return make


def load_cpu(cpu_file):
    """The guest CPUID of a --cpu JSON file (vmm cpuid --json, vmm baseline), read bounded."""
    if not cpu_file:
        return None
    from .. import files
    from ..cpuid import CpuidError, CpuidTable
    text = files.read_text(cpu_file, "guest CPUID JSON file", 16 << 20)
    try:
        data = files.parse_json(text)
    except ValueError as e:
        raise VmmError(f"{cpu_file}: not a CPUID JSON file ({e})") from None
    if isinstance(data, dict) and "cpuid" in data and "entries" not in data:
        data = data["cpuid"]  # a baseline or probe file carries the table under "cpuid"
    try:
        return CpuidTable.from_json(data)
    except (CpuidError, TypeError, KeyError, AttributeError) as e:
        raise VmmError(f"{cpu_file}: not a guest CPUID table ({e})") from None


def console_echo(as_json):
    if as_json:
        return None

    def echo(b):
        sys.stdout.write(b.decode("utf-8", "replace"))
        sys.stdout.flush()
    return echo


def _run_until(m, deadline, t0, vcpu):
    """One `m.run` bounded by the whole run's `deadline` (time.monotonic()): a guest that SYNCs faster
    than a timer set for what is left can fire still ends at the deadline, as a Timeout whose seconds
    count from `t0`, the start of the whole run (the run loop counts from its own call)."""
    from ..guest.runner import Timeout
    left = deadline - time.monotonic()
    if left <= 0:
        return Timeout(vcpu, time.monotonic() - t0, m.vcpus[vcpu].get_regs().rip)
    ev = m.run(timeout=left, vcpu=vcpu)
    if isinstance(ev, Timeout):
        ev.seconds = time.monotonic() - t0
    return ev


def run_to_sync(m, n=1, timeout=10.0, vcpu=0):
    """Run vCPU `vcpu` until its n-th SYNC (1-based); any other ending is an error."""
    from ..guest.runner import Sync
    if n < 1:
        raise VmmError(f"SYNC numbers start at 1, not {n}")
    t0 = time.monotonic()
    deadline = t0 + timeout
    for i in range(n):
        ev = _run_until(m, deadline, t0, vcpu)
        if not isinstance(ev, Sync):
            raise GuestEnded(f"guest {m.image.name!r} ended with '{ev}' before reaching SYNC {n} "
                             f"(it reached {i})", ev)
    return ev


def run_to_end(m, timeout=10.0, as_json=False, vcpu=0):
    """Continue until the guest ends; SYNCs are echoed (text mode) and collected."""
    from ..guest.runner import Sync
    t0 = time.monotonic()
    deadline = t0 + timeout
    syncs = []
    while True:
        ev = _run_until(m, deadline, t0, vcpu)
        if not isinstance(ev, Sync):
            return ev, syncs
        syncs.append(ev.value)
        if not as_json:
            click.echo(str(ev))
