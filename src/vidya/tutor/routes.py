"""The tutor's routes on the server: the page at `/`, its static files (our code and the vendored
libraries and fonts), and the prompt data it builds conversations from. No API key: the page must
load before it can ask for the class code; everything it generates goes through /v1."""
from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vidya.server.errors import bad_request
from vidya.tutor import prompts, vendor

log = logging.getLogger("vidya.server")
NO_CACHE = {"Cache-Control": "no-cache"}


# Below this many parameters a model cannot tutor in Hindi: of the models tried on eight Hindi study
# questions (issue 15), none under 2B answered more than two correctly. The page says so.
DEMO_BELOW_PARAMETERS = 2_000_000_000
RECOMMENDED = "Gemma 3 4B / 12B instruct, Qwen3 8B, Llama 3.1 8B Instruct"


def demo_notice(num_parameters: int | None) -> dict | None:
    """What the page says about a model too small to be trusted, or None."""
    if num_parameters is None or num_parameters >= DEMO_BELOW_PARAMETERS:
        return None
    size = f"{num_parameters / 1e6:.0f}M" if num_parameters < 1e9 else f"{num_parameters / 1e9:.1f}B"
    return {"parameters": num_parameters, "size": size, "recommended": RECOMMENDED}


def add_tutor_routes(app: FastAPI, model_name: str, engine=lambda: None) -> None:
    """`engine()` gives the loaded engine, or None while the model loads."""
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
        e = engine()
        return {**prompts.config(), "model": model_name, "ready": e is not None,
                "demo": demo_notice(e.num_parameters) if e is not None else None}

    @app.get("/tutor/system-prompt")
    async def tutor_system_prompt(subject: str = "science", klass: str | None = None,
                                  class_: str | None = Query(None, alias="class")):
        # the class as `class` (the CLI's --class) or `klass` (the page's name; `class` is a
        # keyword in its JavaScript and Python), never two different ones
        if klass is not None and class_ is not None and klass != class_:
            raise bad_request(f"class {class_!r} and klass {klass!r} differ; give one", param="class")
        try:
            subject_prompt = prompts.system_prompt(subject, class_ or klass or "8")
        except ValueError as e:
            param = "subject" if subject not in prompts.subjects() else ("class" if class_ is not None else "klass")
            raise bad_request(str(e), param=param) from None
        return {"prompt": subject_prompt}
