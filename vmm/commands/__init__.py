"""CLI commands beyond run/caps/guests, one module per concept. Each module defines COMMANDS, a
list of click commands. They are imported only when named on the command line (or listed by
--help), so `vmm run` does not pay for the XSAVE decoder, the register names or the probes."""

import importlib
import importlib.util

import click

MODULES = ("cpuid", "xsave", "amx", "reg", "snapshot", "probe", "sdk", "diff")

# command name -> the module of this package that defines it (a module of MODULES missing here
# is imported whenever a command is looked up: correct, only slower)
LAZY = {"cpuid": "cpuid", "xsave": "xsave", "amx": "amx", "reg": "reg",
        "snapshot": "snapshot", "restore": "snapshot", "inspect": "snapshot",
        "probe": "probe", "compat": "probe", "baseline": "probe", "guest-sdk": "sdk", "diff": "diff"}


def _present(module):
    return importlib.util.find_spec(f"{__name__}.{module}") is not None  # not written yet


def _add(group, module):
    for cmd in importlib.import_module(f"{__name__}.{module}").COMMANDS:
        group.add_command(cmd)


class LazyGroup(click.Group):
    """A click group whose commands from MODULES are imported on first use."""

    def _unlisted(self):
        return [m for m in MODULES if m not in LAZY.values() and _present(m)]

    def list_commands(self, ctx):
        for module in self._unlisted():
            _add(self, module)
        return sorted(set(super().list_commands(ctx)) | set(LAZY))

    def format_commands(self, ctx, formatter):
        """Each command with the whole first sentence of its help, wrapped (click's default cuts
        it at 45 columns, mid-sentence)."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            text = cmd.short_help or " ".join((cmd.help or "").split("\n\n")[0].split())
            rows.append((name, text.split(". ")[0].rstrip(".") if ". " in text else text.rstrip(".")))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None:
            for module in [LAZY[name]] if name in LAZY else self._unlisted():
                _add(self, module)
            cmd = super().get_command(ctx, name)
        return cmd


def register(group):
    """Add every command of every module now (for callers that want the whole tree)."""
    for module in MODULES:
        if _present(module):
            _add(group, module)
