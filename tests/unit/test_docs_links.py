"""The README is the front door and the reference lives under docs/: every relative Markdown link in README.md and
docs/*.md points to a file that exists and, with a `#anchor`, to a heading (or an explicit `<a id>`) of that file;
README.md stays under 300 lines."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
# [text](target) or ![alt](target); the text may hold code spans and wrap onto the next line.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXPLICIT = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text as rendered (links reduced to their text, no backticks), lowercase,
    punctuation dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page offers: its headings' (a repeated heading gets -1, -2, ... as on GitHub) and `<a id>`s."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match[2])
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found | set(EXPLICIT.findall(text))


def links(text: str) -> list[str]:
    """The targets of the Markdown links of a page, code blocks and code spans left out."""
    prose = CODE_SPAN.sub("code", FENCE.sub("", text))
    return [m[1] for m in LINK.finditer(prose)]


def broken_links(page: Path) -> list[str]:
    """`page: target (why)` for each relative link of `page` that points to no file or no heading."""
    broken = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # https:, mailto: ... (not checked here: no network in the suite)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}: {target} (no file {path})")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return broken


def test_the_anchor_rule_is_githubs():
    assert slug("Runs and training curves: `rlhf runs`, `rlhf plot`") == "runs-and-training-curves-rlhf-runs-rlhf-plot"
    assert slug("Does each stage help? The learning benchmark") == "does-each-stage-help-the-learning-benchmark"
    assert slug("Rejection sampling: `rlhf rejection_sampling`") == "rejection-sampling-rlhf-rejection_sampling"
    assert slug("A policy's answers: `rlhf generate`") == "a-policys-answers-rlhf-generate"
    assert anchors('# A\n## B\n## B\n```\n# not a heading\n```\n<a id="x-y"></a>\n') == {"a", "b", "b-1", "x-y"}


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    checked = [p for p in pages() if links(p.read_text())]
    assert ROOT / "README.md" in checked and len(checked) >= 5  # the parser finds links
    broken = [b for page in pages() for b in broken_links(page)]
    assert not broken, broken


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## The `x` section\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#the-x-section) [top](#front) [web](https://example.com) `[code](nowhere.md)`\n"
        "# Front\n[no file](docs/b.md) [no heading](docs/a.md#the-y-section) [wrapped\ntext](#nope)\n"
        "```\n[in a code block](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "README.md: docs/b.md (no file docs/b.md)",
        "README.md: docs/a.md#the-y-section (no heading #the-y-section in a.md)",
        "README.md: #nope (no heading #nope in README.md)",
    ]


def test_the_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"
