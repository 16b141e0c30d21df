"""The tutor's routes on the server: the page at `/`, its static files (our code and the vendored
libraries and fonts), and the prompt data it builds conversations from. No API key: the page must
load before it can ask for the class code; everything it generates goes through /v1."""
from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vidya.server.errors import bad_request
from vidya.tutor import prompts, vendor

log = logging.getLogger("vidya.server")
NO_CACHE = {"Cache-Control": "no-cache"}


def add_tutor_routes(app: FastAPI, model_name: str) -> None:
    if vendor.missing():
        log.warning("tutor page: browser libraries missing (%s); run `make install`", ", ".join(vendor.missing()))
    app.mount("/static", StaticFiles(directory=vendor.STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(vendor.STATIC, "index.html"), headers=NO_CACHE)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(os.path.join(vendor.STATIC, "favicon.svg"), media_type="image/svg+xml")

    @app.get("/tutor/config")
    async def tutor_config():
        return {**prompts.config(), "model": model_name}

    @app.get("/tutor/system-prompt")
    async def tutor_system_prompt(subject: str = "science", klass: str = "8"):
        try:
            return {"prompt": prompts.system_prompt(subject, klass)}
        except ValueError as e:
            raise bad_request(str(e), param="subject") from None
