"""The operators' dashboard (`GET /`): server-rendered pages with a little plain JavaScript for the live parts."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """The dashboard's pages and assets."""
