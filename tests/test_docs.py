"""The README's promises about itself: its links resolve, and its flags table is the plugin's flags."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), flags=re.M)}


def test_readme_links_resolve():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target if target else README
        assert path.exists(), f"README links to a missing {target}"
        if anchor:
            assert anchor in _anchors(path), (
                f"README links to #{anchor}, not a heading of {target or 'README'}"
            )


def test_readme_flags_table_is_the_plugins_flags():
    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.vllm_plugin.cli import _FLAGS

    rows = re.findall(
        r"^\| `(--kv-[\w-]+)`(?:, `--no-[\w-]+`)? \| `(\w+)` \|", README.read_text(), flags=re.M
    )
    assert dict(rows) == {flag: field for flag, (_dest, field, *_rest) in _FLAGS.items()}
    assert {field for _flag, field in rows} <= set(KVPolicyConfig.model_fields)


def test_docs_links_resolve():
    """Inline and reference-style links of every page resolve, anchors included."""
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[\w-]+\]: (\S+)$", text, flags=re.M)
        for link in links:
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            target, _, anchor = link.partition("#")
            path = page.parent / target if target else page
            assert path.exists(), f"{page.name} links to a missing {target}"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{page.name}: #{anchor} is not a heading of {path.name}"


def test_the_product_speaks_of_itself_only():
    """No internal tracker numbers or work-session names in the docs, the README or the code."""
    pattern = re.compile(r"\b(issues? \d+|stops? \d+(-\d+)?)\b", re.I)
    files = [README, *(ROOT / "docs").glob("*.md"), *(ROOT / "cam_vllm").rglob("*.py")]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not hits, hits
