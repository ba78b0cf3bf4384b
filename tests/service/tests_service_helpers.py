"""Assertions shared by the service tests."""

from __future__ import annotations

from typing import Any


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the stable error shape and return its ``error`` object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    if code is not None:
        assert err["code"] == code, err
    return err
