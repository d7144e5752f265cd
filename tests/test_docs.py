"""The documentation stays inside the repository.

* No tracked text file (``*.md``, ``*.py``, ``*.toml``) refers to a file
  outside the repository: the methods text lives in ``docs/methods.md``, not
  in a directory beside the checkout.
* Every relative Markdown link in README.md and docs/*.md points to a file
  that exists (anchors stripped), and no Markdown link anywhere leaves the
  repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Built from pieces so that this file does not match its own patterns.
OUTSIDE_REFERENCES = ("../" + "shared", "shared/" + "METHODS.md")

TEXT_SUFFIXES = (".md", ".py", ".toml")

#: ``[text](target)`` and ``![alt](target)``, target optionally followed by a title
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
#: reference definitions ``[label]: target``
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def tracked_files(suffixes=TEXT_SUFFIXES) -> list[Path]:
    """Files git tracks (what a commit carries), or, outside a git checkout,
    every file below the root except hidden and virtual-environment folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not any(part.startswith(".") or part in ("venv", "build", "dist")
                                            for part in p.relative_to(ROOT).parts)]
    files = [ROOT / n for n in names if n.endswith(suffixes)]
    assert files, "no tracked text files found"
    return sorted(f for f in files if f.is_file())


def markdown_links(text: str) -> list[str]:
    """Link targets of a Markdown text, fenced code blocks left out."""
    text = FENCE.sub("", text)
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def local_target(link: str) -> str | None:
    """The file part of a relative link (no scheme, anchor and query
    stripped); None for external links and pure anchors."""
    if SCHEME.match(link) or link.startswith("//"):
        return None
    path = link.split("#", 1)[0].split("?", 1)[0]
    return path or None


def documentation_files() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [d for d in docs if d.is_file()]


def test_markdown_link_parser():
    text = ("See [a](docs/x.md#part), ![img](pic.png \"title\"), [web](https://example.org), [here](#top),\n"
            "[`code`](<docs/y.md>) and [two\nlines](BENCHMARKS.md).\n"
            "```bash\nfoo [not](a/link.md)\n```\n[ref]: tools/README.md\n")
    targets = [t for t in map(local_target, markdown_links(text)) if t]
    assert targets == ["docs/x.md", "pic.png", "docs/y.md", "BENCHMARKS.md", "tools/README.md"]


def test_methods_document_exists():
    methods = ROOT / "docs" / "methods.md"
    assert methods.is_file()
    text = methods.read_text(encoding="utf-8")
    for section in ("Linearity folding", "Neuron folding", "Coupled folding", "Judging the result"):
        assert section in text, f"docs/methods.md lacks the section {section!r}"


@pytest.mark.parametrize("needle", OUTSIDE_REFERENCES)
def test_no_reference_outside_the_repository(needle):
    offenders = []
    for path in tracked_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if needle in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, f"references to {needle!r}, a path outside the repository:\n" + "\n".join(offenders)


def test_markdown_links_stay_inside_the_repository():
    offenders = []
    for path in tracked_files((".md",)):
        for link in markdown_links(path.read_text(encoding="utf-8")):
            target = local_target(link)
            if target is None:
                continue
            resolved = (path.parent / target).resolve()
            if resolved != ROOT and ROOT not in resolved.parents:
                offenders.append(f"{path.relative_to(ROOT)}: {link}")
    assert not offenders, "Markdown links leaving the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("doc", documentation_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = []
    for link in markdown_links(doc.read_text(encoding="utf-8")):
        target = local_target(link)
        if target is not None and not (doc.parent / target).exists():
            missing.append(link)
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"
