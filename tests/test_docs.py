"""The docs are checked against the tree: the layering table against the imports, every name against a file.

README's first map named six files at paths they no longer had and two import tables disagreed with the
code (issue 21).  A reader trusts a path, a ``file::test`` or a module name they see in the docs, so
each one here must resolve: the layering table in docs/DESIGN.md ("may import") against every module's
imports (``import``, ``from``, and the ``splitrelay.*`` names a module hands to ``importlib``), and
every repository path, ``file::test``, dotted ``splitrelay.*`` name, source file name and Markdown link
in the Markdown files and the Python docstrings and comments against the tree.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"

# Paths the docs may name that are not in the repository, each with its reason.
NOT_IN_TREE = {
    "bench/out": "make bench's scratch directory (gitignored)",
    "bench/udpgen": "the load generator make setup compiles from bench/udpgen.c (gitignored)",
    "vagrant/.vagrant": "Vagrant's state, made by vagrant up (gitignored)",
    "splitrelay/debian12": "a Vagrant box's name (scripts/vm-box.sh), not a path",
    "splitrelay/debian13": "a Vagrant box's name (scripts/vm-box.sh), not a path",
}
# Bare file names the docs may give that no file of the repository has, each with its reason.
NOT_IN_TREE_NAMES = {
    "mybot.py": "the user's own module in docs/VOICE.md's example",
    "speak_lib.h": "espeak-ng's C header, whose API voice/tts.py calls through ctypes",
}
SKIP_DIRS = {".venv", "build", "node_modules", "__pycache__", ".git", ".hypothesis", ".pytest_cache"}
FILE_SUFFIXES = {"h", "c", "json", "yml", "yaml", "service", "md", "py", "sh", "js", "png", "txt", "toml"}


def package_dirs() -> dict[str, Path]:
    """{"edge": ROOT/"edge", ...; "splitrelay": ROOT/"splitrelay"} from pyproject's package-dir."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".", 1)[1] if "." in name else name: ROOT / d for name, d in mapping.items()}


def python_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)
                  and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


# -- the layering table ------------------------------------------------------------------------------


def layering_table() -> dict[str, set[str] | None]:
    """{package: the names its "may import" cell allows (None: everything)} from docs/DESIGN.md."""
    lines = DESIGN.read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("|") and "may import" in line]
    assert len(headers) == 1, f"docs/DESIGN.md must have one table with a 'may import' column, has {len(headers)}"
    packages = package_dirs()
    rows: dict[str, set[str] | None] = {}
    for line in lines[headers[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].strip("`")
        package = name.split(".", 1)[1] if "." in name else name
        allowed = cells[-1]
        if allowed == "everything":
            rows[package] = None
        else:
            rows[package] = {t for t in re.findall(r"`([\w.]+)`", allowed) if t.split(".")[0] in packages}
    return rows


def imports_of(path: Path) -> set[str]:
    """``package`` or ``package.module`` for each splitrelay import (``splitrelay`` for the root's)."""
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    dynamic = any(isinstance(n, (ast.Attribute, ast.Name)) and getattr(n, "attr", getattr(n, "id", None))
                  in ("import_module", "__import__") for n in ast.walk(tree))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"splitrelay(\.\w+)+", node.value):
            names.append(node.value)
    packages = package_dirs()
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "splitrelay":
            continue
        if len(parts) > 1 and parts[1] in packages and parts[1] != "splitrelay":
            found.add(".".join(parts[1:3]))
        else:
            found.add("splitrelay")
    return found


def test_design_has_a_row_for_every_package_and_each_row_names_a_package():
    assert sorted(layering_table()) == sorted(package_dirs())


def test_every_import_is_one_the_design_table_allows_and_every_allowed_name_is_used():
    table = layering_table()
    used: dict[str, set[str]] = {package: set() for package in table}
    refused = []
    for package, directory in package_dirs().items():
        for path in sorted(directory.rglob("*.py")):
            for target in imports_of(path):
                if target.split(".")[0] in (package, "splitrelay"):
                    continue
                allowed = table.get(package, set())
                if allowed is None:
                    continue
                match = {a for a in allowed if a in (target.split(".")[0], target)}
                if not match:
                    refused.append(f"{path.relative_to(ROOT)} imports {target}: DESIGN's row for {package} "
                                   f"does not allow it")
                used[package] |= match
    unused = [f"DESIGN says {package} may import {name}, and no module of it does"
              for package, allowed in table.items() for name in sorted(allowed or ()) if name not in used[package]]
    assert refused + unused == []


# -- every name the docs give resolves --------------------------------------------------------------------


def doc_texts() -> list[tuple[str, str]]:
    """(where, text): every Markdown file at the root and in docs/, every Python docstring and comment."""
    markdown = sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/*.md")])
    texts = [(str(p.relative_to(ROOT)), p.read_text()) for p in markdown]
    for path in python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    line = getattr(node, "lineno", 1)
                    texts.append((f"{path.relative_to(ROOT)}:{line}", doc))
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.COMMENT:
                texts.append((f"{path.relative_to(ROOT)}:{token.start[0]}", token.string))
    return texts


@cache
def top_level() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in ROOT.iterdir() if p.name not in SKIP_DIRS and p.name != ".git"))


def repo_paths(text: str) -> set[str]:
    """Tokens that start with a top-level entry of the repository and a slash: ``edge/agent.py``,
    ``tests/xdp/``.  Not ``/sys/fs/bpf/...`` (a path on the target machine) nor a URL's path."""
    dirs = "|".join(re.escape(d) for d in top_level() if (ROOT / d).is_dir())
    found = set()
    for match in re.finditer(rf"(?<![\w./:$~-])((?:{dirs})/[\w./+-]*)", text):
        path = match.group(1).rstrip(".,:;")
        tail = text[match.end():match.end() + 1]
        if tail in "<*{$" and tail:
            continue        # a pattern: ``/sys/fs/bpf/splitrelay/<instance>``, ``bench/*.c``
        found.add(path.rstrip("/") or path)
    return found


def file_test_refs(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r"((?:[\w./-]+/)?test_\w+\.py)::((?:\w+::)?\w+)", text))


def bare_file_names(text: str) -> set[str]:
    """``relay.c``, ``test_floating.py``: a source file's name without its directory."""
    return set(re.findall(r"(?<![\w/.-])([\w-]+\.(?:py|h|c|sh|js))(?![\w/-]|::)", text))


@cache
def file_names() -> frozenset[str]:
    return frozenset(p.name for p in ROOT.rglob("*") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def module_names(text: str) -> set[str]:
    names = set()
    for match in re.finditer(r"(?<![\w./-])splitrelay(?:\.\w+)+", text):
        name = match.group(0)
        if name.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue        # a file: splitrelay.h
        names.add(name)
    return names


def links(text: str) -> set[str]:
    return {m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", m)}


def module_path(dotted: str) -> tuple[Path | None, list[str]]:
    """The file of the longest module prefix of a dotted name, and the parts left over."""
    packages = package_dirs()
    parts = dotted.split(".")
    base = packages.get(parts[1]) if len(parts) > 1 and parts[1] in packages else packages["splitrelay"]
    rest = parts[2:] if len(parts) > 1 and parts[1] in packages else parts[1:]
    path, i = base, 0
    while i < len(rest) and (path / rest[i]).is_dir():
        path, i = path / rest[i], i + 1
    if i < len(rest) and (path / f"{rest[i]}.py").is_file():
        return path / f"{rest[i]}.py", rest[i + 1:]
    return (path / "__init__.py" if (path / "__init__.py").is_file() else None), rest[i:]


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", path.read_text(), re.M)}


def unresolved(where: str, text: str) -> list[str]:
    problems = []
    base = ROOT / where.split(":")[0]
    for path in sorted(repo_paths(text)):
        if not (ROOT / path).exists() and not any(path == p or path.startswith(p + "/") for p in NOT_IN_TREE):
            problems.append(f"{where}: {path} does not exist")
    for file, test in sorted(file_test_refs(text)):
        candidates = [ROOT / file, ROOT / "tests" / file, *ROOT.glob(f"tests/**/{file}")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            problems.append(f"{where}: {file} (of {file}::{test}) does not exist")
        elif not re.search(rf"^\s*(async )?(def|class) {test.split('::')[-1]}\b", found.read_text(), re.M):
            problems.append(f"{where}: {file} has no {test}")
    for name in sorted(bare_file_names(text) - set(NOT_IN_TREE_NAMES)):
        if name.startswith("test_") and not list(ROOT.glob(f"tests/**/{name}")):
            problems.append(f"{where}: {name} is no file in tests/")
        elif name not in file_names():
            problems.append(f"{where}: {name} is no file of the repository")
    for name in sorted(module_names(text)):
        path, rest = module_path(name)
        if path is None:
            problems.append(f"{where}: {name} is no module")
        elif rest and rest[0] not in top_level_names(path):
            problems.append(f"{where}: {name}: {path.relative_to(ROOT)} defines no {rest[0]}")
    if where.endswith(".md"):
        for link in sorted(links(text)):
            target, _, anchor = link.partition("#")
            file = (base.parent / target).resolve() if target else base
            if not file.exists():
                problems.append(f"{where}: link {link}: {target} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{where}: link {link}: {file.name} has no heading #{anchor}")
    return problems


def test_every_path_test_module_and_link_the_docs_and_docstrings_name_exists():
    problems = [p for where, text in doc_texts() for p in unresolved(where, text)]
    assert problems == []


def test_the_reference_check_catches_each_kind_of_stale_name():
    text = ("`edge/stun.py`, tests/test_floating.py::test_no_such_test, test_nothing_here.py, gone.h, "
            "splitrelay.edge.no_module, splitrelay.errors.NoSuchError, [x](NOPE.md), [y](README.md#no-heading); "
            "fine: /sys/fs/bpf/splitrelay/<instance>, bpf/splitrelay.h, splitrelay.h, bench/out/x.json, relay.c, "
            "tests/test_floating.py, splitrelay.errors.SplitrelayError, [z](README.md#architecture)")
    assert unresolved("README.md", text) == [
        "README.md: edge/stun.py does not exist",
        "README.md: tests/test_floating.py has no test_no_such_test",
        "README.md: gone.h is no file of the repository",
        "README.md: test_nothing_here.py is no file in tests/",
        "README.md: splitrelay.edge.no_module: edge/__init__.py defines no no_module",
        "README.md: splitrelay.errors.NoSuchError: splitrelay/errors.py defines no NoSuchError",
        "README.md: link NOPE.md: NOPE.md does not exist",
        "README.md: link README.md#no-heading: README.md has no heading #no-heading",
    ]


def test_readme_architecture_has_one_line_per_package_each_pointing_to_the_design_table():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    bullets = {m.group(1): m.group(0) for m in re.finditer(r"^\* \*\*`([\w.]+)/`\*\*.*$", section, re.M)}
    assert sorted(bullets) == sorted(d.name for d in package_dirs().values())
    assert [b for b in bullets.values() if "docs/DESIGN.md#packages" not in b] == []
