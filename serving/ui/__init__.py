"""The portal: a static single-page app at /ui, served by the gateway (so through Ray Serve like the API).

It holds no server-side logic of its own. Every view calls the same /v1 routes an application would, with the
signed-in key in an Authorization header, so the server enforces each role and allow-list (401/403); the
page only hides what the key could not use anyway. The key lives in sessionStorage (this tab, until it
closes): never in a URL or a cookie. Chart.js and Tabulator ship inside the package (static/vendor, MIT,
SHA256SUMS), so the portal works offline with no Node.js and no download. A strict Content-Security-Policy
(scripts from this origin only, no inline script) backs up the rule the code follows: user text is only ever
set as text, never parsed as HTML.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def _files() -> dict[str, Path]:
    """The servable files, by URL path under /ui/ (a fixed set: no path from the request touches the disk)."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


def mount(app: FastAPI) -> None:
    files = _files()
    mimetypes.add_type("text/javascript", ".js")

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/{path:path}", include_in_schema=False)
    async def ui_file(path: str):
        target = files.get(path or "index.html")
        if target is None:
            if "." in path.rsplit("/", 1)[-1]:
                return JSONResponse({"error": {"message": f"no portal file {path!r}", "type": "not_found_error",
                                               "param": None, "code": "not_found"}}, status_code=404)
            target = files["index.html"]  # a view's address (/ui/catalog): the app routes it
        return FileResponse(target, headers=HEADERS, media_type=mimetypes.guess_type(target.name)[0])
