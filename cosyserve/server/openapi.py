"""The OpenAPI document (``/openapi.json``, ``/docs``): what FastAPI derives from the routes,
plus what it cannot see, so that the document tells the truth about this server's answers.

Routes that read their own bodies (to refuse oversized or malformed ones before buffering)
declare the body schema by reference; their models are added here. Limits that are settings
(the longest text) are written into the schemas of the app that enforces them. With an API key,
every operation but the open ones says it needs the bearer token.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cosyserve.server.schemas import REFERENCED_MODELS, TEXT_FIELDS
from cosyserve.settings import Settings

REF_TEMPLATE = "#/components/schemas/{model}"


def add_models(schema: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Put ``models`` (and the models they use) into ``components.schemas``."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        definition = model.model_json_schema(ref_template=REF_TEMPLATE)
        for name, nested in definition.pop("$defs", {}).items():
            components.setdefault(name, nested)
        components.setdefault(model.__name__, definition)


def _walk(node: Any):
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


def install_openapi(app: FastAPI, settings: Settings, *, bearer: bool) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            add_models(schema, REFERENCED_MODELS)
            set_text_limits(schema, settings.max_text_chars)
            if bearer:
                # The Authorize button in /docs, without a dependency on every route.
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
