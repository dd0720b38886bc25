"""Probe report files: the versioned schema, validated with the `jsonschema` library on write and
on read."""

import json
from pathlib import Path

from ..errors import VmmError

SCHEMA_ID = "vmm-probe-report/2"  # 2: checks carry their group and selftest; summary per group
SCHEMA_PREFIX = "vmm-probe-report/"
_SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schema"
SCHEMA_FILE = _SCHEMA_DIR / "probe-report.schema.json"
# the report schemas this vmm reads (compat and baseline take reports written by older vmm versions)
READABLE = {"vmm-probe-report/1": _SCHEMA_DIR / "probe-report-1.schema.json", SCHEMA_ID: SCHEMA_FILE}


class ReportError(VmmError):
    """A probe report file that cannot be used: says what is wrong with it."""


def validate(instance, schema):
    """Errors of `instance` against the JSON Schema `schema` (its own $schema draft, default
    2020-12), each "<JSON path>: <what is wrong>", ordered by path; [] when it validates.
    Validation is the `jsonschema` library's; a schema that is itself invalid raises
    jsonschema.SchemaError."""
    import jsonschema  # lazily: only report reading and writing need it
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(instance), key=lambda e: (e.json_path, e.message))
    return [f"{e.json_path}: {e.message}" for e in errors]


def _json_type(v):
    for name, t in (("null", type(None)), ("boolean", bool), ("integer", int), ("number", float),
                    ("string", str), ("array", list), ("object", dict)):
        if isinstance(v, t):
            return name
    return type(v).__name__


def load_schema(schema_id=SCHEMA_ID):
    """The JSON schema of report version `schema_id` (one of READABLE)."""
    with open(READABLE[schema_id]) as f:
        return json.load(f)


def check_report(data, source="report"):
    """Raise ReportError unless `data` is a probe report this vmm reads."""
    if not isinstance(data, dict):
        raise ReportError(f"{source}: not a vmm probe report (a JSON {_json_type(data)}, not an object)")
    schema = data.get("schema")
    if schema is None:
        raise ReportError(f"{source}: not a vmm probe report (no 'schema' field)")
    if schema not in READABLE:
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            raise ReportError(f"{source}: probe report schema {schema!r} is not one this vmm reads "
                              f"({', '.join(READABLE)}); write the report again with this vmm's `vmm probe`")
        raise ReportError(f"{source}: not a vmm probe report (schema {schema!r}, expected {SCHEMA_ID!r})")
    problems = validate(data, load_schema(schema))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ReportError(f"{source}: invalid {schema} report: " + "; ".join(problems[:3]) + more)
    return data


def load_report(path):
    """Read and validate a probe report file; raises ReportError with what is wrong."""
    from .. import files
    try:
        text = files.read_text(path, "vmm probe report", 64 << 20)
    except files.FileError as e:
        raise ReportError(str(e)) from None
    try:
        data = files.parse_json(text)
    except ValueError as e:
        what = "truncated" if text.strip() and not text.rstrip().endswith(("}", "]")) else "not valid JSON"
        raise ReportError(f"{path}: {what}: {e}") from None
    return check_report(data, str(path))
