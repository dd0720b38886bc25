"""vmm/records.py: the dataclasses that write their __init__ out (cold start) take exactly their
fields, in order, with the fields' defaults, and compare, show and hash as `@dataclass` would."""

import dataclasses
import inspect

import pytest

from vmm import cpuid, cstructs, records, xsave_layout
from vmm.guest import catalog, runner, runtime

MODULES = (cstructs, runner, runtime, catalog, cpuid, xsave_layout)
CLASSES = sorted({c for m in MODULES for c in vars(m).values()
                  if isinstance(c, type) and issubclass(c, records.Record) and c.__module__ == m.__name__},
                 key=lambda c: c.__qualname__)


def test_the_cold_start_path_declares_its_dataclasses_cheap():
    names = {c.__name__ for c in CLASSES}
    assert {"Regs", "Sregs", "Segment", "DTable", "EntryState", "Image", "Requirement", "CpuidEntry",
            "XsaveComponent", "XsaveLayout", "Event", "Sync", "Done", "Timeout", "Fault"} <= names


def _sample(f, i):
    """A value for field `f` that differs from its default."""
    if f.type in (int, "int"):
        return 1000 + i
    if f.type in (bool, "bool"):
        return True
    if f.type in (float, "float"):
        return 1.5 + i
    return f"v{i}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_init_takes_the_fields_with_their_defaults(cls):
    assert dataclasses.is_dataclass(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    assert [p.name for p in params] == [f.name for f in fields]
    required = {}
    for p, f in zip(params, fields):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default and type(p.default) is type(f.default), f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert p.default is None, f"{f.name}: None stands for a fresh default_factory()"
        else:
            assert p.default is inspect.Parameter.empty, f.name
            required[f.name] = _sample(f, len(required))
    obj = cls(**required)
    for f in fields:
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(obj, f.name) == f.default_factory(), f.name
            assert getattr(obj, f.name) is not getattr(cls(**required), f.name), "fresh each time"
        elif f.name not in required:
            assert getattr(obj, f.name) == f.default, f.name
    # every field is stored where it belongs (positionally too)
    values = {f.name: _sample(f, i) for i, f in enumerate(fields)}
    for o in (cls(**values), cls(*values.values())):
        assert {n: getattr(o, n) for n in values} == values


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_eq_repr_hash_as_a_dataclass(cls):
    fields = [f for f in dataclasses.fields(cls) if f.init]
    values = {f.name: _sample(f, i) for i, f in enumerate(fields)}
    a, b = cls(**values), cls(**values)
    assert a == b and not a != b
    assert repr(a) == f"{cls.__qualname__}(" + ", ".join(
        f"{f.name}={getattr(a, f.name)!r}" for f in dataclasses.fields(cls) if f.repr) + ")"
    for f in fields:
        c = dataclasses.replace(a, **{f.name: "other"})
        assert (c == a) is (not f.compare), f.name
    other = type("Other", (), {})()
    assert a != other and (a == other) is False
    if cls.__dataclass_params__.frozen:
        assert hash(a) == hash(b)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(a, fields[0].name, 1)
    else:
        with pytest.raises(TypeError):
            hash(a)


def test_a_subclass_is_not_equal_to_its_base():
    assert runner.Event(0) != runner.Done(0) and runner.Done(0) == runner.Done(0)
    assert runner.Sync(0, 0x11) == runner.Sync(vcpu=0, value=0x11) != runner.Sync(0, 0x12)
