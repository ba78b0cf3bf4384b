"""The multipart form of ``POST /search/image``: the uploaded photo plus every option of
``POST /search`` as form fields, validated into the JSON route's ``SearchRequest`` (one
set of options for both routes), and the form's OpenAPI schema.

The accepted fields are read from ``SearchRequest``'s own JSON schema, so an option added
there is taken by the form without editing this module. ``facets`` may repeat, objects
such as ``boosts`` are JSON text, and a blank field means "not given".
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile

from clipsearch.retrieval.service.config import ServiceConfig
from clipsearch.retrieval.service.errors import ApiError
from clipsearch.retrieval.service.schemas import SearchRequest

# The multipart form of POST /search/image (documented in OpenAPI under this name).
IMAGE_FORM = "SearchImageForm"
# SearchRequest fields that name another query than the uploaded photo.
_NOT_IN_IMAGE_FORM = frozenset({"image", "image_url", "like_doc", "terms"})
# Form fields a request may repeat (a browser form's checkboxes) and values per field.
_MAX_FORM_FIELDS = 256


def _form_kinds() -> dict[str, set[str]]:
    """SearchRequest field -> the JSON types it accepts ("array", "object", "boolean"...),
    read from its JSON schema so a field added there is taken by the form too."""
    out: dict[str, set[str]] = {}
    for name, prop in SearchRequest.model_json_schema()["properties"].items():
        if name in _NOT_IN_IMAGE_FORM:
            continue
        branches = prop.get("anyOf", [prop])
        out[name] = {str(b.get("type", "object" if "$ref" in b else "")) for b in branches}
    return out


def image_form_schema() -> dict[str, Any]:
    """OpenAPI schema of the multipart form: the photo, then SearchRequest's option fields
    (an object-valued field becomes JSON text: a form carries strings)."""
    props = SearchRequest.model_json_schema()["properties"]
    fields: dict[str, Any] = {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "The query image (JPEG, PNG, WebP...).",
        }
    }
    for name, kinds in _form_kinds().items():
        prop = dict(props[name])
        if name == "text":
            prop["description"] = "Words refining the photo ('but blue'); optional."
        if "object" in kinds:
            prop = {
                "type": "string",
                "description": f"{prop.get('description', '')} In this form: text (JSON for "
                "an object).",
            }
        elif "anyOf" in prop:
            # A form cannot carry null: an option is left out instead (or sent blank).
            branches = [b for b in prop.pop("anyOf") if b.get("type") != "null"]
            prop.pop("default", None)
            if len(branches) == 1:
                prop.update(branches[0])
            else:
                prop["anyOf"] = branches
        fields[name] = prop
    return {
        "type": "object",
        "properties": fields,
        "required": ["image"],
        "additionalProperties": False,  # unknown fields are 422
    }


async def read_image_form(request: Request, config: ServiceConfig) -> tuple[bytes, SearchRequest]:
    """The uploaded photo's bytes and the form's options as one SearchRequest (the JSON
    route's model and validation). Blank fields count as not given; a field that is not
    an option of /search, a second photo, or a field of the wrong type is 422."""

    try:
        form = await request.form(max_files=1, max_fields=_MAX_FORM_FIELDS)
    except Exception as e:  # starlette: too many parts, not multipart, bad boundary
        raise ApiError(
            422,
            "invalid_request",
            f"send the photo as multipart/form-data with an 'image' file part ({e})",
            details={"field": "image"},
        ) from e
    try:
        upload, body = _form_request(form)
        raw = await _read_upload(upload, config)
    finally:
        await form.close()  # the spooled temporary files of the parts
    return raw, body


def _form_request(form: Any) -> tuple[UploadFile, SearchRequest]:
    """The photo part and the SearchRequest of a parsed multipart form (see
    :func:`read_image_form`)."""
    from pydantic import ValidationError

    kinds = _form_kinds()
    upload: UploadFile | None = None
    values: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == "image":
            if not isinstance(value, UploadFile):
                raise _form_error("image", "must be a file part, not a text field")
            upload = value
            continue
        if name not in kinds:
            allowed = ", ".join(sorted(kinds))
            raise _form_error(
                name,
                f"is not a field of this form (the photo is 'image'; options: {allowed}); "
                "for a query by URL, doc or composed terms use POST /search",
            )
        if isinstance(value, UploadFile):
            raise _form_error(name, "must be a text field, not a file")
        if not value.strip():
            continue  # an empty form input: not given
        if "array" in kinds[name]:
            if value.lstrip().startswith("["):
                values.setdefault(name, []).extend(_json_field(name, value))
            else:
                values.setdefault(name, []).append(value)
        elif name in values:
            raise _form_error(name, "is given twice; send it once")
        elif "object" in kinds[name] and (
            value.lstrip().startswith("{") or "string" not in kinds[name]
        ):
            values[name] = _json_field(name, value)
        elif "boolean" in kinds[name] and value.strip().lower() in ("true", "false"):
            values[name] = value.strip().lower() == "true"
        else:
            values[name] = value
    if upload is None:
        raise _form_error("image", "is missing: add the photo as a file part named 'image'")
    try:
        return upload, SearchRequest.model_validate(values)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]
        raise RequestValidationError(errors) from e


def _json_field(name: str, value: str) -> Any:
    """A form field holding JSON; 400 ``bad_request`` naming it when it does not parse
    (the form documents these fields as text: only their content is wrong)."""
    try:
        return json.loads(value)
    except ValueError as e:
        raise ApiError(
            400,
            "bad_request",
            f"{name}: is not valid JSON ({e}); send it as JSON text, e.g. "
            + ("'{\"rating\": 0.01}'" if name == "boosts" else "'[\"colour\"]'"),
            details={"field": name},
        ) from e


def _form_error(field: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {problem}", details={"field": field})


async def _read_upload(upload: UploadFile, config: ServiceConfig) -> bytes:
    raw = await upload.read(config.max_image_bytes + 1)
    if len(raw) > config.max_image_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"image: upload exceeds the limit of {config.max_image_bytes:,} bytes",
            details={"field": "image", "limit": config.max_image_bytes},
        )
    return raw
