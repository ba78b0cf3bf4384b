"""Service test fixtures live in service_fixtures.py (a unique module name, so tests can
import its helpers without clashing with other conftest modules)."""

from service_fixtures import catalog, make_client

__all__ = ["catalog", "make_client"]
