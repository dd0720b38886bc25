"""Cheap dataclasses for the modules `vmm run` imports (cold start).

`@dataclass` compiles the source of each method it generates (__init__, __repr__, __eq__; more when
frozen) with exec, at import: about 0.3 ms per class, and the `vmm run` path holds some twenty.
Those classes are declared `@dataclass(init=False, repr=False, eq=False)` over Record (FrozenRecord
with frozen=True): they keep their fields (dataclasses.fields, asdict, replace work as ever), write
their __init__ out (tests/test_records.py checks it against the fields: names, order, defaults),
and get from here the __eq__, __repr__ (and for frozen ones __hash__) a dataclass would generate.
"""

from dataclasses import fields


def _names(cls, which):
    """The field names of dataclass `cls` with `which` ("compare", "repr") set, in field order;
    computed once per class."""
    key = "_record_" + which
    names = cls.__dict__.get(key)
    if names is None:
        names = tuple(f.name for f in fields(cls) if getattr(f, which))
        setattr(cls, key, names)
    return names


class Record:
    """Field-wise __eq__ (same class, equal compared fields) and __repr__ (`Name(a=1, b='x')`),
    as `@dataclass` generates them."""

    __slots__ = ()

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = _names(self.__class__, "compare")
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)

    __hash__ = None  # mutable, as a dataclass with eq and not frozen

    def __repr__(self):
        return (f"{self.__class__.__qualname__}("
                + ", ".join(f"{n}={getattr(self, n)!r}" for n in _names(self.__class__, "repr")) + ")")


class FrozenRecord(Record):
    """Record for `@dataclass(frozen=True, ...)`: hashable by its compared fields."""

    __slots__ = ()

    def __hash__(self):
        return hash(tuple(getattr(self, n) for n in _names(self.__class__, "compare")))
