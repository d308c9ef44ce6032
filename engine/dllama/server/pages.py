"""The two pages dllama-api serves (`/`: chat, `/cluster`: the boards) and their scripts and
style, from the package's static/ folder, read once: a fixed list of files, no path from the
request ever reaches the file system.

The pages hold no secret, so they are served without the API key; every API call they make
sends it. Each response carries a Content-Security-Policy that runs only these scripts and lets
them talk only to this server: nothing a model writes can run here, even if it slipped into the
page as markup (the scripts never parse model text as HTML either).
"""
from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
PAGES = {"/": "chat.html", "/cluster": "cluster.html"}


class Pages:
    def __init__(self) -> None:
        folder = resources.files("dllama.server") / "static"
        self.files = {f.name: f.read_bytes() for f in folder.iterdir()
                      if f.is_file() and any(f.name.endswith(ext) for ext in TYPES)}
        missing = [name for name in PAGES.values() if name not in self.files]
        if missing:
            raise FileNotFoundError(f"the package lacks its pages: {', '.join(missing)} (reinstall dllama-cluster)")

    async def page(self, request: Request) -> Response:
        return self._file(PAGES[request.url.path])

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.files or name.endswith(".html"):
            return Response("not found", status_code=404, media_type="text/plain", headers=HEADERS)
        return self._file(name)

    def _file(self, name: str) -> Response:
        media = next(t for ext, t in TYPES.items() if name.endswith(ext))
        return Response(self.files[name], media_type=media, headers=HEADERS)
