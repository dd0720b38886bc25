"""Built-in guests: flat binaries built by `make guests` from guests/*.S, plus their symbols."""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GuestError

SOURCE_DIR = Path(__file__).resolve().parents[2] / "guests"


def build_dir():
    return Path(os.environ.get("VMM_GUESTS_DIR", SOURCE_DIR / "build"))


@dataclass
class Image:
    name: str
    code: bytes
    symbols: dict = field(default_factory=dict)
    description: str = ""


def _symbols(path):
    syms = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
    return syms


def _description(name):
    src = SOURCE_DIR / f"{name}.S"
    if src.exists():
        m = re.search(r"/\*\s*(.*?)\s*\*/", src.read_text(), re.S)
        if m:
            lines = (ln.strip().removeprefix("*").strip() for ln in m.group(1).splitlines())
            text = " ".join(" ".join(ln for ln in lines if ln).split())
            return text.split(": ", 1)[-1] if text.startswith(name + ":") else text
    return ""


def names():
    """Built-in guest names (every guests/*.S but the runtime)."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.S") if p.stem != "runtime")


def load(name_or_path):
    """A built-in guest by name, or a flat binary file by path (loaded at 1 MiB)."""
    if os.sep in name_or_path or name_or_path.endswith(".bin"):
        path = Path(name_or_path)
        if not path.is_file():
            raise GuestError(f"guest file {path} does not exist")
        return Image(path.stem, path.read_bytes(), _symbols(path.with_suffix(".sym")))
    if name_or_path not in names() and name_or_path != "runtime":
        raise GuestError(f"unknown guest {name_or_path!r}; built-in guests: {', '.join(names())} "
                         "(or give a path to a flat binary)")
    path = build_dir() / f"{name_or_path}.bin"
    if not path.is_file():
        raise GuestError(f"guest {name_or_path!r} is not built ({path} missing): run `make guests`")
    return Image(name_or_path, path.read_bytes(), _symbols(path.with_suffix(".sym")),
                 _description(name_or_path))
