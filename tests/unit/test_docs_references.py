"""Every reference to the algorithms manual (`docs/algorithms.md section N.M`, `sections A and B`, `sections A-B`,
`docs/algorithms.md#anchor`) in the code, configs, scripts, README and the other docs pages points to a section or
anchor that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANUAL = ROOT / "docs" / "algorithms.md"
NUMS = r"(?P<nums>[0-9.]+(?:\s*(?:-|and|,)\s*[0-9.]+)*)"
CITE = re.compile(r"docs/algorithms\.md(?:\s+sections?\s+" + NUMS + r"|#(?P<anchor>[a-z0-9-]+))")


def sources() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "Makefile"]
    found += [p for p in sorted((ROOT / "docs").glob("*.md")) if p != MANUAL]  # the pages the README links to
    for folder, pattern in (("rlhf_cli", "*.py"), ("configs", "*.yaml"), ("tests", "*.py"), ("scripts", "*.py")):
        found += sorted((ROOT / folder).rglob(pattern))
    return [p for p in found if p != Path(__file__).resolve()]  # this file names the patterns it looks for


def manual_sections() -> tuple[set[str], set[str]]:
    text = MANUAL.read_text()
    numbers = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', text))
    return numbers, anchors


def test_the_manual_has_every_section_the_code_cites():
    numbers, anchors = manual_sections()
    assert {"1", "4", "4.10", "8.4", "9"} <= numbers and {"ppo", "critic-free"} <= anchors  # the parser works
    missing, cites = [], 0
    for path in sources():
        # A citation may wrap onto the next line of a comment or docstring.
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text(errors="replace"))
        for cite in CITE.finditer(text):
            cites += 1
            wanted = re.findall(r"\d+(?:\.\d+)?", cite["nums"] or "") if cite["nums"] else []
            missing += [f"{path.relative_to(ROOT)}: section {n}" for n in wanted if n.rstrip(".") not in numbers]
            if cite["anchor"] and cite["anchor"] not in anchors:
                missing.append(f"{path.relative_to(ROOT)}: #{cite['anchor']}")
    assert cites >= 40  # every reference the code had to the team note now points here
    assert not missing, missing


def test_nothing_points_to_the_team_note_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in sources() if "ALGORITHMS.md" in p.read_text(errors="replace")]
    assert not offenders
