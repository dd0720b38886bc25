"""Probe report files: the versioned schema and a validator for the subset of JSON Schema it uses
(type, required, properties, items, enum, const, additionalProperties), on write and on read."""

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


# --- JSON Schema (the subset the shipped schema uses) ----------------------------------------------
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
SUPPORTED_KEYWORDS = {"type", "required", "properties", "items", "enum", "const", "additionalProperties",
                      "$schema", "$id", "title", "description"}


def validate(instance, schema, path="$"):
    """Errors of `instance` against `schema` (type, required, properties, items, enum, const,
    additionalProperties), each naming its JSON path; [] when it validates. A schema keyword
    outside that subset raises ValueError rather than being ignored."""
    unknown = set(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path} uses unsupported keywords: {', '.join(sorted(unknown))}")
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        for t in types:
            if t not in _TYPES:
                raise ValueError(f"schema at {path}: unknown type {t!r}")
        if not any(_TYPES[t](instance) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {_json_type(instance)}"]
    if "const" in schema and not _json_equal(instance, schema["const"]):
        errors.append(f"{path}: must be {json.dumps(schema['const'])}, got {json.dumps(instance)[:60]}")
    if "enum" in schema and not any(_json_equal(instance, e) for e in schema["enum"]):
        errors.append(f"{path}: must be one of {', '.join(json.dumps(e) for e in schema['enum'])}, "
                      f"got {json.dumps(instance)[:60]}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing required field {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            sub = f"{path}.{key}"
            if key in props:
                errors += validate(value, props[key], sub)
            elif extra is False:
                errors.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, sub)
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _json_type(v):
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](v):
            return name
    return type(v).__name__


def _json_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


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
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a vmm probe report (not text)") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        what = "truncated" if text.strip() and not text.rstrip().endswith(("}", "]")) else "not valid JSON"
        raise ReportError(f"{path}: {what}: {e}") from None
    return check_report(data, str(path))
