"""The OpenAPI document (``/openapi.json``, ``/docs``): what FastAPI derives from the routes,
plus what it cannot see, so that the document tells the truth about this server's answers.

Routes that read their own bodies (to refuse oversized or malformed ones before buffering)
declare the body schema by reference; their models are added here. Limits that are settings
(the longest text) are written into the schemas of the app that enforces them. With an API key,
every operation but the open ones says it needs the bearer token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cosyserve.server.schemas import REFERENCED_MODELS, TEXT_FIELDS, ErrorResponse
from cosyserve.settings import Settings

REF_TEMPLATE = "#/components/schemas/{model}"
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def add_models(schema: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Put ``models`` (and the models they use) into ``components.schemas``."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        definition = model.model_json_schema(ref_template=REF_TEMPLATE)
        for name, nested in definition.pop("$defs", {}).items():
            components.setdefault(name, nested)
        components.setdefault(model.__name__, definition)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def set_text_limits(schema: dict[str, Any], max_chars: int) -> None:
    """``maxLength`` on every text field: the server refuses longer text (COSYSERVE_MAX_TEXT_CHARS)."""
    for node in _walk(schema):
        properties = node.get("properties")
        if not isinstance(properties, dict):
            continue
        for name in TEXT_FIELDS & properties.keys():
            field = properties[name]
            if field.get("type") == "string":
                field["maxLength"] = max_chars


# Body fields and parameters that name an existing voice (or the model).
_VOICE_PROPERTIES = frozenset({"spk_id", "voice"})
_VOICE_PARAMETERS = frozenset({"spk_id", "name", "voice_id"})
_MODEL_PROPERTIES = frozenset({"model"})
_MODEL_PARAMETERS = frozenset({"model_id"})


def add_examples(schema: dict[str, Any], voices: list[str], models: list[str]) -> None:
    """``examples`` with this server's voice ids and model names on the fields and parameters
    that name one, so that /docs offers working values."""

    def annotate(field: Any, values: list[str]) -> None:
        if values and isinstance(field, dict):
            field.setdefault("examples", values[:8])

    for node in _walk(schema):
        for name, field in (node.get("properties") or {}).items():
            if name in _VOICE_PROPERTIES:
                annotate(field, voices)
            elif name in _MODEL_PROPERTIES:
                annotate(field, models)
        if node.get("in") in ("query", "path"):
            name = str(node.get("name"))
            if name in _VOICE_PARAMETERS:
                annotate(node.get("schema"), voices)
            elif name in _MODEL_PARAMETERS:
                annotate(node.get("schema"), models)


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _ERROR_CONTENT}


def add_error_responses(schema: dict[str, Any], *, bearer: bool, open_paths: frozenset[str]) -> None:
    """The answers every operation may give besides its own: FastAPI documents its 422, but this
    server answers a bad parameter with 400; the middleware refuses a missing key (401), a
    foreign browser origin or host name (403, without a key) and an oversized body (413)."""
    add_models(schema, (ErrorResponse,))
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error("invalid parameter (the message says what to fix)"))
            if bearer and path not in open_paths:
                responses.setdefault("401", _error("missing or wrong API key"))
            if not bearer:
                responses.setdefault("403", _error("a browser request from a foreign origin or host name"))
            if "requestBody" in operation:
                responses.setdefault("413", _error("request body too large"))
    # FastAPI's own validation-error models are never sent.
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def install_openapi(
    app: FastAPI,
    settings: Settings,
    *,
    bearer: bool,
    open_paths: frozenset[str] = frozenset(),
    examples: Callable[[], tuple[list[str], list[str]]] | None = None,
) -> None:
    """Replace ``app.openapi`` with the complete document (built once, on first use).
    ``examples()``: the voice ids and model names to show (read when the document is built)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            add_models(schema, REFERENCED_MODELS)
            set_text_limits(schema, settings.max_text_chars)
            add_error_responses(schema, bearer=bearer, open_paths=open_paths)
            if examples is not None:
                add_examples(schema, *examples())
            if bearer:
                # The Authorize button in /docs, without a dependency on every route.
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
