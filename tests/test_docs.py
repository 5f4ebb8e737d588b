"""Every markdown file that the code and the docs cite exists, and every section of docs/nvlm.md
that they cite exists.

A reference is a path that ends in `.md`: `docs/gpu.md`, `README.md`. Paths are relative to the
repository root, so a bare name such as `DESIGN.md` must be a file at the root. A section citation
is "docs/nvlm.md section 6", "docs/nvlm.md sections 1 and 8", "docs/nvlm.md sections 3-7" or
"docs/nvlm.md §8"; each number must be a `## N.` heading of docs/nvlm.md.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED_FOLDERS = ("nvlm", "nvlm_kernels", "csrc", "benchmarks", "tests", "scripts", "docs")
SCANNED_SUFFIXES = {".py", ".sh", ".cu", ".cuh", ".cpp", ".h", ".md", ".toml"}
SCANNED_ROOT_FILES = ("README.md", "setup.py", "CMakeLists.txt", "pyproject.toml", ".ci/run")
# Files that the code writes, named in it, not documents of the repository.
WRITTEN_FILES = {
    "report.md",   # benchmarks/gpu_check.py writes it into the GPU check's output folder
    "table.md",    # benchmarks/report.py's usage line redirects its output there
}

# A path ending in .md, not preceded by a path character (so not the tail of a URL or a longer
# path); `*.md` is a pattern, not a reference, and does not match.
MD_REFERENCE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")
# "docs/nvlm.md section 6" and its variants; the gap may hold the quotes and comment marks of a
# citation split over two lines of code.
SECTION_CITATION = re.compile(
    r"docs/nvlm\.md[\s\"'(,#/*]*(?:sections?|§)\s*(\d+(?:\s*(?:-|–|,|and)\s*\d+)*)")
SECTION_HEADING = re.compile(r"^## (\d+)\.", re.MULTILINE)


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_ROOT_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_FOLDERS:
        files += sorted(path for path in (ROOT / folder).rglob("*")
                        if path.suffix in SCANNED_SUFFIXES and path.is_file()
                        and not any(part.startswith(".") for part in path.relative_to(ROOT).parts))
    return [path for path in files if path != Path(__file__).resolve()]


def matches(pattern: re.Pattern) -> list[tuple[str, re.Match]]:
    """("file:line", match) for every match of `pattern` in the scanned files."""
    found = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match))
    return found


def cited_sections(numbers: str) -> list[int]:
    """'6' -> [6]; '1 and 8' -> [1, 8]; '3-7' -> [3, 4, 5, 6, 7]."""
    sections = []
    for first, last in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", numbers):
        sections += range(int(first), int(last or first) + 1)
    return sections


def test_cited_markdown_files_exist():
    missing = [f"{where}: {match.group(1)}" for where, match in matches(MD_REFERENCE)
               if match.group(1) not in WRITTEN_FILES and not (ROOT / match.group(1)).is_file()]
    assert not missing, ("references to markdown files that do not exist (paths are relative to "
                         "the repository root):\n" + "\n".join(missing))


def test_cited_sections_of_docs_nvlm_exist():
    nvlm_md = ROOT / "docs" / "nvlm.md"
    headings = set(SECTION_HEADING.findall(nvlm_md.read_text(encoding="utf-8")))
    missing = [f"{where}: section {n} ({match.group(0)!r})"
               for where, match in matches(SECTION_CITATION)
               for n in cited_sections(match.group(1)) if str(n) not in headings]
    assert not missing, "docs/nvlm.md has no such section:\n" + "\n".join(missing)
