"""The judge's modules (compat, probe, snapshot, baseline, guest.machine and what they share: host,
sources, the CPUID field model, the MSR table, the dump reader, state): their import graph (every
import, at module level or inside a function) has no cycle, and none of them uses another module's
private names."""

import ast
from pathlib import Path

VMM = Path(__file__).resolve().parent.parent / "vmm"


def _module_name(path):
    rel = path.relative_to(VMM.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """(imported module, imported names) of every import statement in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if (VMM.parent / (sub.replace(".", "/") + ".py")).exists()
                            or (VMM.parent / sub.replace(".", "/")).is_dir() else target, a.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
    return out


def _graph():
    graph = {}
    for p in VMM.rglob("*.py"):
        graph[_module_name(p)] = _imports(p)
    return graph


def _top(mod):
    """vmm.probe.report -> vmm.probe (a package is one node)."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in ("probe", "commands", "guest") and \
        parts[1] != "guest" else mod


DOMAIN = {"vmm.compat", "vmm.probe", "vmm.snapshot", "vmm.baseline", "vmm.guest.machine", "vmm.host",
          "vmm.compat_inputs", "vmm.sources", "vmm.cpuid_model", "vmm.msr_features", "vmm.state", "vmm.cpudump", "vmm.amx",
          "vmm.kvm", "vmm.regs"}


def test_no_import_cycle_among_domain_modules():
    edges = {}
    for mod, imps in _graph().items():
        a = _top(mod)
        if a not in DOMAIN:
            continue
        for target, _ in imps:
            b = _top(target)
            if b in DOMAIN and b != a:
                edges.setdefault(a, set()).add(b)
    # depth-first search for a cycle, reporting it
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"
    for n in sorted(edges):
        if n not in state:
            visit(n)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for mod, imps in _graph().items():
        if _top(mod) not in DOMAIN:
            continue
        for target, name in imps:
            if not target.startswith("vmm") or name is None:
                continue
            last = target.rsplit(".", 1)[-1]
            if name.startswith("_") and not name.startswith("__") and last != name \
                    and _top(target) != _top(mod) and not name.startswith(("_kvm", "_bindings", "_ioctls")):
                bad.append(f"{mod} imports {target}.{name}")
    assert bad == []
