"""The documentation stays true to the tree: the configuration reference is the generator's output
for today's schema, and every relative link in README.md, docs/ and benchmarks/ points to a file
(and heading) that exists."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_regenerated():
    gen = _generator()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == gen.render(), (
        "docs/configuration.md is stale (the schema or a conf/ group changed): "
        "run python docs/gen_config_reference.py and commit the result"
    )


def _pages() -> List[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
    return [p for p in pages if p.is_file()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(page: Path, cache: Dict[Path, Set[str]]) -> Set[str]:
    if page not in cache:
        seen: Dict[str, int] = {}
        anchors: Set[str] = set()
        for line in FENCE.sub("", page.read_text()).splitlines():
            match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if match:
                slug = _slug(match.group(1))
                n = seen.get(slug, 0)
                seen[slug] = n + 1
                anchors.add(slug if n == 0 else f"{slug}-{n}")
        cache[page] = anchors
    return cache[page]


def test_relative_links_point_to_existing_files():
    broken: List[str] = []
    cache: Dict[Path, Set[str]] = {}
    for page in _pages():
        text = CODE.sub("", FENCE.sub("", page.read_text()))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved, cache):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
