"""python -m vmm.probe --check NAME ...: run checks in this (fresh) process; JSON results on stdout."""

import json
import sys

from ..errors import VmmError
from .core import CHECKS, Context, get_check, ProbeError
from .run import run_check


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m vmm.probe",
                                description="Run probe checks in this (fresh) process; JSON results on stdout.")
    p.add_argument("--check", action="append", default=[], metavar="NAME", help="a check to run (repeatable)")
    p.add_argument("--device", default="/dev/kvm")
    p.add_argument("--kernel", default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="list the checks")
    args = p.parse_args(argv)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:<36} {'fresh process: ' + c.process if c.process else 'in process':<28} {c.title}")
        return 0
    try:
        checks = [get_check(n) for n in args.check]
        ctx = Context(args.device, kernel=args.kernel, fresh=True)
    except VmmError as e:
        print(f"vmm.probe: error: {e}", file=sys.stderr)
        return 2
    try:
        results = [run_check(ctx, c) for c in checks]
    except ProbeError as e:
        print(f"vmm.probe: error: {e}", file=sys.stderr)
        return 2
    finally:
        ctx.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
