"""The API docs UI (Swagger UI 5, which reads OpenAPI 3.1), served from assets installed with the
package — swagger-ui-py's copy of swagger-ui-dist — so the page works offline and loads nothing
from a CDN: `/schema` (and `/schema/swagger`) for the page, `/schema/openapi.json` for the document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import swagger_ui
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router

ASSETS: Final = "/schema/assets"
_STATIC: Final = Path(swagger_ui.__file__).parent / "static"


def render_plugins() -> list[SwaggerRenderPlugin]:
    return [
        SwaggerRenderPlugin(
            js_url=f"{ASSETS}/swagger-ui-bundle.js",
            css_url=f"{ASSETS}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
            path="/swagger",
        )
    ]


def assets_router() -> Router:
    return create_static_files_router(path=ASSETS, directories=[_STATIC], include_in_schema=False, name="docs-assets")
