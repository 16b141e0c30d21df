"""Copies the browser libraries the page uses from node_modules (installed from the npm registry
by `make`, see package.json) into static/vendor, so the server serves them itself: a school
network may have no internet, and the page must never reach a CDN.
Run: python -m vidya.tutor.vendor [NODE_MODULES]"""
from __future__ import annotations

import os
import re
import shutil
import sys

STATIC = os.path.join(os.path.dirname(__file__), "static")
VENDOR = os.path.join(STATIC, "vendor")
FILES = {  # node_modules path -> vendor path
    "marked/lib/marked.umd.js": "marked.umd.js",
    "dompurify/dist/purify.min.js": "purify.min.js",
    "katex/dist/katex.min.js": "katex/katex.min.js",
    "katex/dist/katex.min.css": "katex/katex.min.css",
    "katex/dist/contrib/auto-render.min.js": "katex/auto-render.min.js",
    "@fontsource/noto-sans-devanagari/files/noto-sans-devanagari-devanagari-400-normal.woff2":
        "fonts/noto-sans-devanagari-devanagari-400-normal.woff2",
    "@fontsource/noto-sans-devanagari/files/noto-sans-devanagari-devanagari-700-normal.woff2":
        "fonts/noto-sans-devanagari-devanagari-700-normal.woff2",
    "@fontsource/noto-sans-devanagari/files/noto-sans-devanagari-latin-400-normal.woff2":
        "fonts/noto-sans-devanagari-latin-400-normal.woff2",
    "@fontsource/noto-sans-devanagari/files/noto-sans-devanagari-latin-700-normal.woff2":
        "fonts/noto-sans-devanagari-latin-700-normal.woff2",
}
FONT_CSS = """/* Noto Sans Devanagari (SIL Open Font License), from @fontsource/noto-sans-devanagari */
@font-face { font-family: 'Noto Sans Devanagari'; font-style: normal; font-display: swap; font-weight: 400;
  src: url(./noto-sans-devanagari-devanagari-400-normal.woff2) format('woff2');
  unicode-range: U+0900-097F, U+1CD0-1CF9, U+200C-200D, U+20A8, U+20B9, U+25CC, U+A830-A839, U+A8E0-A8FF; }
@font-face { font-family: 'Noto Sans Devanagari'; font-style: normal; font-display: swap; font-weight: 700;
  src: url(./noto-sans-devanagari-devanagari-700-normal.woff2) format('woff2');
  unicode-range: U+0900-097F, U+1CD0-1CF9, U+200C-200D, U+20A8, U+20B9, U+25CC, U+A830-A839, U+A8E0-A8FF; }
@font-face { font-family: 'Noto Sans Devanagari'; font-style: normal; font-display: swap; font-weight: 400;
  src: url(./noto-sans-devanagari-latin-400-normal.woff2) format('woff2');
  unicode-range: U+0000-00FF, U+2000-206F, U+20AC, U+2122; }
@font-face { font-family: 'Noto Sans Devanagari'; font-style: normal; font-display: swap; font-weight: 700;
  src: url(./noto-sans-devanagari-latin-700-normal.woff2) format('woff2');
  unicode-range: U+0000-00FF, U+2000-206F, U+20AC, U+2122; }
"""


def missing() -> list[str]:
    return [v for v in [*FILES.values(), "fonts/noto-sans-devanagari.css", "katex/fonts"]
            if not os.path.exists(os.path.join(VENDOR, v))]


def main(node_modules: str = "node_modules") -> int:
    for src, dst in FILES.items():
        path = os.path.join(node_modules, src)
        if not os.path.exists(path):
            print(f"vidya: error: {path} is missing; run `npm install` in the project root", file=sys.stderr)
            return 2
        os.makedirs(os.path.dirname(os.path.join(VENDOR, dst)), exist_ok=True)
        shutil.copyfile(path, os.path.join(VENDOR, dst))
    # the stylesheet names each font three times (woff2, woff, ttf); the woff2 alone is copied
    css = os.path.join(VENDOR, "katex", "katex.min.css")
    with open(css) as f:
        text = re.sub(r',url\(fonts/[^)]*\.(?:woff|ttf)\) format\("(?:woff|truetype)"\)', "", f.read())
    with open(css, "w") as f:
        f.write(text)
    fonts = os.path.join(VENDOR, "katex", "fonts")
    shutil.rmtree(fonts, ignore_errors=True)
    shutil.copytree(os.path.join(node_modules, "katex", "dist", "fonts"), fonts,
                    ignore=shutil.ignore_patterns("*.ttf", "*.woff"))  # woff2 is enough for every browser we target
    with open(os.path.join(VENDOR, "fonts", "noto-sans-devanagari.css"), "w") as f:
        f.write(FONT_CSS)
    print(f"vidya: browser libraries copied to {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
