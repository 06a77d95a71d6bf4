"""Citations point inside the repository (docs/README.md): no docstring, comment, config or note cites a file
that is not in the repository, every `docs/<file>.md §Heading` names a heading that exists, and the READMEs link to
docs files that exist. Fast: text scans only."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SCANNED = (".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".ipynb")
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "raw", "outputs", "multirun", ".whl",
                ".device", ".gpu_scratch", ".pytest_cache"}

# Notes that live outside the repository (the project's design notes before docs/ existed): never cite them.
OUTSIDE = re.compile(r"research/|/work/shared|\.\./shared|\bDESIGN\.md\b|\bMETHOD\.md\b")
# The outside notes' file names: a bare `methods.md` means one of them (or a docs file cited without its path).
OUTSIDE_NAMES = {"DESIGN.md", "METHOD.md", "methods.md", "environment.md", "zeroshot-and-statistics.md",
                 "style-and-ecosystem.md", "gpu-step-anatomy.md"}
# A path-like mention of a Markdown file: `notes/gpu.md`, `docs/methods.md`, `methods.md`.
MD_MENTION = re.compile(r"(?<![\w./<>-])((?:[\w.-]+/)*[\w-]+\.md)\b")
# `docs/<file>.md`, then optionally `§Title`, `§A, §B`, `§A and §B` (a title ends at punctuation or a line end).
TITLE = r"§([^§()\[\],;:.`'\"\n]+)"
DOCS_CITATION = re.compile(r"(?<![\w./-])docs/([\w-]+\.md)`?((?:(?:\s+|\s*,\s*|\s+and\s+|\s*/\s*)" + TITLE + r")*)")
SECTION = re.compile(TITLE)
# `README "What a run records"`, `results/efficiency/README.md "Protocol"`: a README cited by a heading.
README_SECTION = re.compile(r'(?<![\w./-])((?:[\w.-]+/)*README(?:\.md)?) "([^"]+)"')
MD_LINK = re.compile(r"\]\(([^)\s#]*\.md)?(?:#([^)\s]+))?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def scanned_files() -> list[Path]:
    """Every text file of the repository a citation can be in (code, configs, tests, notes, docs, results),
    except this test, whose planted examples are bad citations on purpose."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        found += [Path(folder) / name for name in sorted(files) if Path(name).suffix in SCANNED]
    return [path for path in found if path != Path(__file__).resolve()]


def headings(path: Path) -> set[str]:
    """The heading titles of a Markdown file (code blocks excluded); a title with a parenthesis or a colon is also
    known by the words before it (a citation's title ends at punctuation)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    titles = {title.strip() for title in HEADING.findall(text)}
    return titles | {re.split(r"[(:]", title)[0].strip() for title in titles}


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _title(raw: str) -> str:
    title = raw.strip()
    for tail in (" and", " or", " /"):
        if title.endswith(tail):
            title = title[: -len(tail)].rstrip()
    return title


def _with_continuation(line: str, following: str) -> str:
    """`line`, plus the start of the next line when a citation runs over the line break (`docs/x.md` or an
    unterminated `§Title` at the end): the title is read on to its punctuation, so a wrapped title is checked whole."""
    tail = line.rstrip()
    ends_in_title = SECTION.search(tail) and re.search(TITLE + r"$", tail)
    if not (re.search(r"docs/[\w-]+\.md`?$", tail) or ends_in_title):
        return line
    cited_at = tail.rfind("docs/") if "docs/" in tail else tail.rfind("§")
    if "#" in tail[:cited_at] and not following.lstrip().startswith("#"):
        return line  # a comment after code: the next line is code, not the comment's continuation
    rest = following.lstrip(" \t#\"'>*")
    stop = re.search(r"[§()\[\],;:.`'\"]", rest)
    return tail + " " + (rest[: stop.start()] if stop and not rest.startswith("§") else rest)


def _outside_and_missing_notes(line: str, where: Path, repo: Path, notes: set[str]) -> list[str]:
    """Outside notes cited, and Markdown paths that are not files of the repository."""
    problems = []
    outside = OUTSIDE.search(line)
    if outside:
        problems.append(f"cites '{outside.group(0)}', which is outside the repository (cite docs/ instead)")
    for mention in MD_MENTION.findall(line):
        if "://" in line.split(mention)[0][-12:]:
            continue
        # a path must exist; a bare name only counts as a citation when it names a note (else: an output file)
        cites = "/" in mention or mention in notes
        if cites and not ((repo / mention).is_file() or (where.parent / mention).is_file()):
            problems.append(f"'{mention}' is not a file of the repository (give its path from the repository root, "
                            "or from the citing file's folder)")
    return problems


def _docs_sections(line: str, docs: Path) -> tuple[list[str], set[int]]:
    """`docs/x.md §Title` citations whose file or heading does not exist; also where the attached §s are."""
    problems, attached = [], set()
    for cite in DOCS_CITATION.finditer(line):
        target = docs / cite.group(1)
        if not target.is_file():
            listed = ", ".join(sorted(p.name for p in docs.glob("*.md")))
            problems.append(f"docs/{cite.group(1)} does not exist (docs/: {listed})")
            continue
        known = headings(target)
        for section in SECTION.finditer(cite.group(2)):
            attached.add(cite.start(2) + section.start())
            if _title(section.group(1)) not in known:
                problems.append(f"docs/{cite.group(1)} has no heading '{_title(section.group(1))}' "
                                f"(headings: {', '.join(sorted(known))})")
    return problems, attached


def _readme_sections(line: str, where: Path, repo: Path) -> list[str]:
    """`README "Heading"` citations whose README or heading does not exist."""
    problems = []
    for readme, title in README_SECTION.findall(line):
        readme = readme if readme.endswith(".md") else readme + ".md"
        cited = next((f for f in (repo / readme, where.parent / readme) if f.is_file()), None)
        if cited is None:
            problems.append(f"{readme} does not exist")
        elif title not in headings(cited):
            problems.append(f"{readme} has no heading '{title}'")
    return problems


def _links(line: str, where: Path) -> list[str]:
    """Markdown links `[x](file.md#anchor)` to a file or heading that does not exist."""
    problems = []
    for target, anchor in MD_LINK.findall(line):
        if target.startswith("http") or (not target and not anchor):
            continue
        linked = (where.parent / target) if target else where
        if not linked.is_file():
            problems.append(f"link to {target}, which does not exist")
        elif anchor and anchor not in {slug(t) for t in headings(linked)}:
            problems.append(f"link to {target or where.name}#{anchor}, which is not a heading there")
    return problems


def citation_problems(text: str, where: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with the citations in `text` (the contents of file `where`): outside files, Markdown files that
    do not exist, docs sections and README headings that do not exist, broken Markdown links. One line each."""
    docs = repo / "docs"
    notes = OUTSIDE_NAMES | {p.name for folder in ("docs", "notes") for p in (repo / folder).glob("*.md")}
    lines = text.splitlines()
    problems = []
    for number, line in enumerate(lines, 1):
        found = _outside_and_missing_notes(line, where, repo, notes)
        line = _with_continuation(line, lines[number] if number < len(lines) else "")
        sections, attached = _docs_sections(line, docs)
        found += sections + _readme_sections(line, where, repo)
        if where.parent == docs:  # a bare §Title inside a docs file names a heading of that file
            found += [f"{where.name} has no heading '{_title(s.group(1))}'" for s in SECTION.finditer(line)
                      if s.start() not in attached and _title(s.group(1)) not in headings(where)]
        if where.suffix == ".md":
            found += _links(line, where)
        at = f"{where.relative_to(repo) if where.is_relative_to(repo) else where}:{number}"
        problems += [f"{at}: {problem}" for problem in found]
    return problems


@pytest.fixture(scope="module")
def all_problems() -> list[str]:
    return [p for path in scanned_files() for p in citation_problems(path.read_text(encoding="utf-8"), path)]


def test_every_citation_points_inside_the_repository(all_problems):
    assert not all_problems, "bad citations:\n" + "\n".join(all_problems)


def test_the_scan_covers_code_configs_tests_and_notes():
    names = {p.relative_to(REPO).as_posix() for p in scanned_files()}
    for expected in ("methods/lors.py", "lorsbench/pipeline.py", "conf/method/lors.yaml", "tests/test_pipeline.py",
                     "README.md", "notes/gpu.md", "docs/methods.md", "results/efficiency/README.md"):
        assert expected in names, f"{expected} is not scanned"


def test_readme_links_to_docs_that_exist_and_the_index_lists_every_doc():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"docs/([\w-]+\.md)", readme))
    assert cited, "README.md links to no docs file"
    missing = sorted(name for name in cited if not (DOCS / name).is_file())
    assert not missing, f"README.md cites docs files that do not exist: {missing}"
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    unlisted = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md" and f"({p.name})" not in index)
    assert not unlisted, f"docs/README.md does not link {unlisted}"


def test_the_checker_catches_each_kind_of_bad_citation(tmp_path):
    """Planted citations: each must be reported, the good ones not (the check itself can fail)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "m.md").write_text("# M\n\n## LoRS backward\n\n## SPP\n\nsee §SPP and §Nope.\n")
    (tmp_path / "notes.md").write_text("x\n")
    (tmp_path / "README.md").write_text("# R\n\n## What a run records\n")
    where = tmp_path / "pkg" / "mod.py"
    where.parent.mkdir()
    bad = {
        "methods.md 5.3": "'methods.md' is not a file",
        "research/environment.md section 4b": "outside the repository",
        "(DESIGN.md \"Measurements\")": "outside the repository",
        "docs/m.md §LoRS forward)": "no heading 'LoRS forward'",
        "docs/m.md §SPP, §LoRS gradients)": "no heading 'LoRS gradients'",
        "docs/nope.md": "docs/nope.md does not exist",
        "`docs/m.md` §Nope.": "no heading 'Nope'",
        "(docs/m.md §LoRS\n    forward).": "no heading 'LoRS forward'",
        "(docs/m.md\n# §Nope).": "no heading 'Nope'",
        '(README "Caches")': "README.md has no heading 'Caches'",
    }
    for text, expected in bad.items():
        found = citation_problems(text, where, repo=tmp_path)
        assert any(expected in p for p in found), f"{text!r} not reported: {found}"
    good = ("(docs/m.md §LoRS backward), docs/m.md §SPP and §LoRS backward; notes.md, docs/m.md\n"
            '(README "What a run records")\n'
            "(docs/m.md §LoRS\n  backward); docs/m.md\n  §SPP.")
    assert citation_problems(good, where, repo=tmp_path) == []
    inside = citation_problems((tmp_path / "docs" / "m.md").read_text(), tmp_path / "docs" / "m.md", repo=tmp_path)
    assert len(inside) == 1 and "no heading 'Nope'" in inside[0]  # a bare § in a docs file names its own heading
    links = tmp_path / "docs" / "x.md"
    links.write_text("# X\n\n[a](m.md#spp) [b](m.md#lors-forward) [c](gone.md) [d](#x)\n")
    link = [p for p in citation_problems(links.read_text(), links, repo=tmp_path) if "link to" in p]
    assert len(link) == 2 and "m.md#lors-forward" in link[0] and "gone.md" in link[1]


OWN_PATH = re.compile(r"`((?:lorsbench|methods|conf|tests|scripts|results|notes|docs)/[\w./<>*-]*)`")
MODULE = re.compile(r"python -m (lorsbench(?:\.\w+)*)")


def test_the_docs_name_files_and_modules_that_exist():
    """docs/*.md name the code they describe: every repository path in backticks and every `python -m` module
    there exists (a rename elsewhere must update the docs)."""
    missing = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        for path in OWN_PATH.findall(text):
            if "<" in path or "*" in path:  # a pattern (`conf/method/<name>.yaml`): its folder must exist
                path = path.split("<")[0].split("*")[0].rpartition("/")[0]
            if not (REPO / path.split(":")[0]).exists() and not path.startswith("results/raw"):  # raw: git-ignored
                missing.append(f"{doc.name}: `{path}`")
        for module in MODULE.findall(text):
            file = REPO / module.replace(".", "/")
            if not (file.with_suffix(".py").is_file() or (file / "__main__.py").is_file()):
                missing.append(f"{doc.name}: python -m {module}")
    assert not missing, "docs name what does not exist:\n" + "\n".join(missing)
