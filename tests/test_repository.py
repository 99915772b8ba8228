"""The repository stands on its own: license, citation, and documents that only point inside it."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAPER = "ReweightOOD: Loss Reweighting for Distance-based OOD Detection"


def _tracked(pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): fall back to the tree
        return sorted(REPO.rglob(pattern))
    return [REPO / p for p in out.stdout.split()]


def test_apache_license_text_and_metadata():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def test_citation_names_the_paper():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["title"] == PAPER and paper["year"] == 2024
    assert [a["family-names"] for a in paper["authors"]][:2] == ["Regmi", "Panthi"]
    readme = (REPO / "README.md").read_text()
    assert PAPER in readme and "CVPR" in readme


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.strip()]
    block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert [ln.split("#")[0].strip() for ln in block] == ["make demo", "make test"]


def test_markdown_links_stay_inside_the_repository():
    """Every relative link of every tracked Markdown file names a file of the repository."""
    broken = []
    for md in _tracked("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (md.parent / target).resolve()
            if not path.exists() or REPO not in path.parents:
                broken.append(f"{md.relative_to(REPO)} -> {target}")
    assert broken == []


def test_no_document_points_outside_the_repository():
    patterns = [r"\.\./shared/DESIGN"]
    if REPO.parent != Path(REPO.anchor):        # the folder holding the checkout, unless it is /
        patterns.append(re.escape(f"{REPO.parent}/"))
    outside = re.compile("|".join(patterns))
    offenders = [str(p.relative_to(REPO)) for p in _tracked("*.md") if outside.search(p.read_text())]
    assert offenders == []
    assert not (REPO / "docs" / "HELPERS.md").exists()
