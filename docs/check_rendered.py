"""Check the built HTML of the API page, not only that Sphinx ran without warnings.

    python docs/check_rendered.py docs/_build/html

Each phrase below is one that a rendering bug once mangled (a custom section parsed as a
parameter list dropped words, left literal double backquotes, turned ``offset: -2`` into
``offset – -2``; attribute types printed JAX's private array class).
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

EXPECTED = [
    "Shapes",
    "or carries a time axis in position -3 (offset: -2)",
    "batch_shape is the broadcast of the arguments",
    "mask [..., T] bool",
]
# a role split across lines (":class:`~numpyro_lds.\n    Name`") is printed as text
FORBIDDEN = ["``", "jaxlib", "offset – -2", ":class:", ":func:", ":meth:", ":attr:"]


def page_text(path: Path) -> str:
    """The page's visible text, tags dropped and whitespace collapsed."""
    raw = re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8"))
    return re.sub(r"\s+", " ", html.unescape(raw))


def main(build_dir: str) -> int:
    text = page_text(Path(build_dir) / "api.html")
    problems = [f"missing: {p!r}" for p in EXPECTED if p not in text]
    problems += [f"present: {p!r}" for p in FORBIDDEN if p in text]
    for p in problems:
        print(f"api.html {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html"))
