"""The tutor's prompts, read from the versioned data file prompts/v1.json: a system prompt is
the base text + the subject's addition + the class's addition."""
from __future__ import annotations

import functools
import json
import os

PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "prompts", "v1.json")


@functools.cache
def load() -> dict:
    with open(PROMPTS_FILE, encoding="utf-8") as f:
        return json.load(f)


def subjects() -> dict[str, dict[str, str]]:
    return {k: v["name"] for k, v in load()["subjects"].items()}


def classes() -> list[str]:
    return sorted(load()["classes"], key=int)


def system_prompt(subject: str, klass: str) -> str:
    data = load()
    if subject not in data["subjects"]:
        raise ValueError(f"unknown subject {subject!r}; one of {', '.join(data['subjects'])}")
    if str(klass) not in data["classes"]:
        raise ValueError(f"unknown class {klass!r}; one of {', '.join(classes())}")
    return "\n\n".join([data["base"], data["subjects"][subject]["prompt"], data["classes"][str(klass)]])


def config() -> dict:
    """What the page needs to build its choices (no prompt text: it asks for that per choice)."""
    data = load()
    return {"version": data["version"], "subjects": subjects(), "classes": classes(), "examples": data["examples"]}
