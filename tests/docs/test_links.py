"""Every link in the README and in docs/ resolves inside the repository (a clone has nothing
beside it), and every "contract.md §N" cited in the tree names a section the contract has."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def documents():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def tracked_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked source tree): walk it
        return [p for p in ROOT.rglob("*") if p.is_file() and "build" not in p.parts]
    return [ROOT / line for line in listed.stdout.splitlines()]


def broken_links(document, text):
    """The relative links of `text` (a document at path `document`) that name no file of the
    repository."""
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (document.parent / target.split("#")[0]).resolve()
        if ROOT not in path.parents or not path.exists():
            broken.append(target)
    return broken


def test_links_resolve_inside_the_repository():
    broken = [f"{d.relative_to(ROOT)}: {target}" for d in documents()
              for target in broken_links(d, d.read_text(encoding="utf-8"))]
    assert not broken, "links that do not resolve inside the repository: " + ", ".join(broken)


def test_the_link_check_can_fail():
    text = "[contract](../shared/DESIGN.md), [gone](docs/nothing.md), [ok](docs/contract.md)"
    assert broken_links(ROOT / "README.md", text) == ["../shared/DESIGN.md", "docs/nothing.md"]


def test_cited_contract_sections_exist():
    contract = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", contract, re.MULTILINE)}
    assert sections == set(range(1, max(sections) + 1))
    cited = re.compile(r"contract\.md §(\d+)(?:[–-](\d+))?")
    missing = []
    for path in tracked_files():
        if path.suffix not in {".md", ".hpp", ".cpp", ".py", ".h"} or not path.exists():
            continue
        for first, last in cited.findall(path.read_text(encoding="utf-8", errors="replace")):
            for number in range(int(first), int(last or first) + 1):
                if number not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: §{number}")
    assert not missing, "citations of contract sections that do not exist: " + ", ".join(missing)
