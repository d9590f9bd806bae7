"""Immich's real OpenAPI spec as a contract: validate requests and responses against it.

The spec is read from `<repo>/../shared/immich/immich-openapi-specs.json` (never copied into the
project). `load()` returns None where it is absent; tests then skip (in CI it is present and the
suite forbids skips). The spec is OpenAPI 3.0 (`nullable: true`), which jsonschema does not know,
so nullable schemas are rewritten to JSON-Schema unions before validation; `$ref`s resolve inside
the spec's own `components`.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
from typing import Any, Iterable, Mapping

import jsonschema

from .proc import ROOT

SPEC_PATH = ROOT.parent / "shared" / "immich" / "immich-openapi-specs.json"
BASE_PATH = "/api"  # the spec's servers: [{"url": "/api"}]


def _openapi_to_jsonschema(node: Any) -> Any:
    if isinstance(node, list):
        return [_openapi_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-")}
    if out.pop("nullable", False):
        if "type" in out and "$ref" not in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


class Spec:
    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.version = raw["info"]["version"]
        self._components = _openapi_to_jsonschema(copy.deepcopy(raw["components"]))

    # -- lookup ----------------------------------------------------------------------------------
    def operation(self, method: str, path: str) -> Mapping[str, Any] | None:
        """The operation for a request path such as /api/queues, or None if the spec has none."""
        if not path.startswith(BASE_PATH + "/"):
            return None
        rel = path[len(BASE_PATH):]
        for template, ops in self.raw["paths"].items():
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, rel):
                return ops.get(method.lower())
        return None

    def response_schema(self, method: str, path: str, status: int) -> Mapping[str, Any] | None:
        op = self.operation(method, path)
        if op is None:
            return None
        resp = op.get("responses", {}).get(str(status))
        if resp is None:
            return None
        content = resp.get("content", {}).get("application/json")
        return None if content is None else content["schema"]

    def validator(self, schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
        root = {"allOf": [_openapi_to_jsonschema(copy.deepcopy(dict(schema)))], "components": self._components}
        return jsonschema.Draft7Validator(root)

    # -- checks ----------------------------------------------------------------------------------
    def response_errors(self, method: str, path: str, status: int, body: bytes | str) -> list[str]:
        """Reasons the response does not match the spec ([] = it does)."""
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: not in the spec"]
        if str(status) not in op.get("responses", {}):
            return [f"{method} {path}: status {status} not documented"]
        schema = self.response_schema(method, path, status)
        if schema is None:
            return []
        try:
            doc = json.loads(body)
        except ValueError as e:
            return [f"{method} {path}: body is not JSON ({e})"]
        return [f"{method} {path}: {e.json_path}: {e.message}" for e in self.validator(schema).iter_errors(doc)]

    def request_errors(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
                       body: bytes) -> list[str]:
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: not in the spec"]
        errs = []
        declared = {p["name"] for p in op.get("parameters", []) if p.get("in") == "query"}
        for name in query:
            if name not in declared:
                errs.append(f"{method} {path}: undeclared query parameter {name!r}")
        for p in op.get("parameters", []):
            if p.get("required") and p.get("in") == "query" and p["name"] not in query:
                errs.append(f"{method} {path}: missing required query parameter {p['name']!r}")
        if body and "requestBody" not in op:
            errs.append(f"{method} {path}: has a body but the operation takes none")
        content = op.get("requestBody", {}).get("content", {}).get("application/json")
        if content is not None:
            if not body:
                if op["requestBody"].get("required"):
                    errs.append(f"{method} {path}: the operation needs a JSON body")
            else:
                try:
                    doc = json.loads(body)
                except ValueError as e:
                    errs.append(f"{method} {path}: the body is not JSON ({e})")
                else:
                    errs += [f"{method} {path}: body {e.json_path}: {e.message}"
                             for e in self.validator(content["schema"]).iter_errors(doc)]
        secured = bool(op.get("security"))
        has_key = any(k.lower() == "x-api-key" for k in headers)
        if not secured and has_key:
            errs.append(f"{method} {path}: sends x-api-key to an operation that needs no auth")
        if secured and has_key:
            schemes = {next(iter(s)) for s in op["security"] if s}
            if "api_key" not in schemes:
                errs.append(f"{method} {path}: x-api-key is not an accepted scheme here")
        return errs

    def permission(self, method: str, path: str) -> tuple[bool, bool, str | None]:
        """(needs auth, admin only, permission) of an operation, from the spec's extensions."""
        op = self.operation(method, path) or {}
        return bool(op.get("security")), bool(op.get("x-immich-admin-only")), op.get("x-immich-permission")

    def queue_names(self) -> list[str]:
        return list(self.raw["components"]["schemas"]["QueueName"]["enum"])

    def feature_names(self) -> list[str]:
        return list(self.raw["components"]["schemas"]["ServerFeaturesDto"]["required"])


def load() -> Spec | None:
    if not SPEC_PATH.is_file():
        return None
    return Spec(json.loads(SPEC_PATH.read_text()))


def only(errors: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """Errors that are not explained by any of the `allowed` regular expressions."""
    pats = [re.compile(a) for a in allowed]
    return [e for e in errors if not any(p.search(e) for p in pats)]
