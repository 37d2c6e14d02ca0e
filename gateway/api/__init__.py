"""The admin HTTP API (aiohttp): ``server`` answers the routes, ``openapi`` describes them."""

from gateway.api.openapi import openapi_document
from gateway.api.server import AdminAPI

__all__ = ["AdminAPI", "openapi_document"]
