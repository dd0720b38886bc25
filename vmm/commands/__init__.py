"""CLI commands beyond run/caps/guests, one module per concept. Each module defines COMMANDS,
a list of click commands; `register` adds those of every module present in this package."""

import importlib
import importlib.util

MODULES = ("cpuid", "xsave", "amx", "reg", "snapshot", "probe", "sdk", "diff")


def register(group):
    for name in MODULES:
        full = f"{__name__}.{name}"
        if importlib.util.find_spec(full) is None:
            continue  # not written yet
        for cmd in importlib.import_module(full).COMMANDS:
            group.add_command(cmd)
