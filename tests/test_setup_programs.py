"""Every program the project runs comes from a package scripts/setup.sh installs, or from the venv.

A fresh machine failed tests/test_floating.py with ``nsenter: failed to execute iptables``: setup.sh
never installed iptables, and the machines where the suite was green had it by hand (issue 21).  So
the programs are read from the source, not from a list kept by hand: every argv the Python code and
the tests hand to subprocess, ``nsenter_argv`` or a lab's ``run``/``popen``, every absolute
``/usr/bin/...`` path, and every command word of the shell scripts.  Each is then traced with
``dpkg -S`` (along its symlink and alternatives chain) to a Debian package that the script which
prepares the machine installs.  A new module, test or script is checked without touching this file.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Packages no install step needs to name, each with what the project runs from it: every one is
# Essential or of priority required on Debian (checked against dpkg below, so this list cannot
# claim a package that is not part of every Debian system).
BASE_PACKAGES = {
    "bash": "Essential: the scripts' shell",
    "dash": "Essential: sh (sh -c in bench/system.py and the tests)",
    "coreutils": "Essential: cat, stat, sleep, true, timeout, mkdir, ln, dd, sort, ...",
    "util-linux": "Essential: nsenter, unshare, taskset, mountpoint (setup.sh names it too)",
    "mount": "priority required: mount, umount",
    "grep": "Essential", "sed": "Essential", "tar": "Essential", "findutils": "Essential: xargs",
    "dpkg": "Essential: dpkg, dpkg-query", "apt": "priority required: apt-get",
}

# The VM targets' scripts run after `make vm-deps` (scripts/vm-deps.sh), every other one and all the
# Python after `make setup`: the packages a program may come from, by where it is run.
VM_SCRIPTS = re.compile(r"^(scripts/vm-[\w-]+\.sh|vagrant/.*)$")
INSTALLERS = {"setup": ["scripts/setup.sh"], "vm": ["scripts/setup.sh", "scripts/vm-deps.sh"]}
# Scripts that do not run on this host at all, with the reason.
ELSEWHERE = {
    "scripts/vm-matrix-guest.sh": "runs inside a kernel-matrix guest, built from packages by vm-box.sh's "
                                  "debootstrap --include and exercised by make vm-check",
}

# Names that look like argv[0] in the source but are not a program looked up on PATH.
SHELL_WORDS = {
    # keywords and builtins of bash and sh
    "if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case", "esac",
    "function", "select", "time", "!", "{", "}", "[", "[[", "]]", "cd", "echo", "printf", "set", "export",
    "local", "return", "exit", "read", "shift", "source", ".", "trap", "wait", "command", "declare", "test",
    "true", "false", "eval", "exec", "unset", "break", "continue", "type", "readonly", "umask", "getopts",
    "let", "shopt", "pushd", "popd", "hash", "ulimit", "kill", "builtin", ":", "mapfile", "typeset",
}
# The command runs the next word (after its own options) as a program.
WRAPPERS = {"exec", "sudo", "nohup", "env", "xargs", "unshare", "nsenter", "setsid", "chroot"}
EXEC_CALLS = {"run", "Popen", "popen", "check_output", "check_call", "call", "create_subprocess_exec", "spawn",
              "nsenter_argv", "execvp", "execv", "execvpe", "exec_py"}
ABSOLUTE_PROGRAM = re.compile(r"^/(usr/)?s?bin/[\w.+-]+$")


# -- Python: the argvs handed to a process -------------------------------------------------------------


def _constants(node: ast.AST, loops: dict[str, list[str]]) -> list[str] | None:
    """The string values ``node`` can have: a literal, or a loop variable over literals; None if unknown."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)]
    if isinstance(node, ast.Name) and node.id in loops:
        return loops[node.id]
    return None


def _loop_values(func: ast.AST) -> dict[str, list[str]]:
    """``for tool in ("iptables", "ip6tables")`` and ``for tool, a, b in (("iptables", ...), ...)``."""
    values: dict[str, list[str]] = {}
    for node in ast.walk(func):
        if not isinstance(node, (ast.For, ast.comprehension)) or not isinstance(node.iter, (ast.Tuple, ast.List)):
            continue
        targets = node.target.elts if isinstance(node.target, ast.Tuple) else [node.target]
        for i, target in enumerate(targets):
            if not isinstance(target, ast.Name):
                continue
            items = [e.elts[i] if isinstance(node.target, ast.Tuple) and isinstance(e, ast.Tuple)
                     and len(e.elts) > i else e for e in node.iter.elts]
            if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items):
                values[target.id] = [e.value for e in items]
    return values


def _programs_of_argv(elts: list[ast.AST], loops: dict[str, list[str]]) -> list[str]:
    """argv[0] (after a leading ``*prefix``), and the program a wrapper in it runs."""
    words = [_constants(e, loops) for e in elts]
    i = 0
    while i < len(elts) and isinstance(elts[i], ast.Starred):
        i += 1
    found: list[str] = []
    while i < len(elts) and words[i] is not None:
        first = words[i]
        found += first
        rest = [w[0] if w else None for w in words[i + 1:]]
        if first == ["ip"] and rest[:2] == ["netns", "exec"]:
            i += 4
        elif first in (["taskset"], ["timeout"]):
            i += 3 if rest[:1] == ["-c"] else 2
        elif first[0] in WRAPPERS:
            i += 1
            while i < len(elts) and words[i] is not None and words[i][0].startswith("-"):
                i += 1
        elif first[0] in ("sh", "bash") and rest[:1] == ["-c"] and len(rest) > 1 and rest[1]:
            found += shell_programs(rest[1])
            break
        else:
            break
    return found


def _argv_lists(func: ast.AST) -> list[ast.AST]:
    """List literals that reach a process: passed to an exec-like call, assigned to a name that is,
    or returned by a function named ``*argv``."""
    passed: set[str] = set()
    lists: list[ast.AST] = []
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in EXEC_CALLS:
                for arg in [*node.args, *(k.value for k in node.keywords if k.arg in ("args", "argv", "cmd"))]:
                    arg = arg.value if isinstance(arg, ast.Starred) else arg
                    if isinstance(arg, ast.BinOp):
                        arg = arg.left
                    if isinstance(arg, (ast.List, ast.Tuple)):
                        lists.append(arg)
                    elif isinstance(arg, ast.Name):
                        passed.add(arg.id)
        if isinstance(node, ast.FunctionDef) and node.name.endswith("argv"):
            lists += [r.value for r in ast.walk(node)
                      if isinstance(r, ast.Return) and isinstance(r.value, ast.List)]
    for node in ast.walk(func):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):     # not +=: that adds arguments
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value.left if isinstance(node.value, ast.BinOp) else node.value
            if any(isinstance(t, ast.Name) and t.id in passed for t in targets) and isinstance(value, ast.List):
                lists.append(value)
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id in passed \
                and isinstance(node.iter, (ast.Tuple, ast.List)):       # for argv in (["ip", ...], [...]):
            lists += [e for e in node.iter.elts if isinstance(e, ast.List)]
    return lists


def python_programs(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        loops = _loop_values(scope)
        for argv in _argv_lists(scope):
            found.update(_programs_of_argv(argv.elts, loops))
    found.update(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and ABSOLUTE_PROGRAM.match(n.value))
    return {p for p in found if p and not p.startswith("-") and " " not in p}


# -- shell: the command words of a script ------------------------------------------------------------


_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1[^\n]*\n(.*?)\n\s*\2\s*$", re.S | re.M)
OPERATORS = set(";&|()\n")


def _closing(text: str, i: int) -> int:
    """Index just past the ``)`` matching the ``(`` before ``i``, skipping quoted text."""
    depth = 1
    while i < len(text) and depth:
        c = text[i]
        if c in "'\"":
            i = text.find(c, i + 1)
            if i < 0:
                return len(text)
        depth += (c == "(") - (c == ")")
        i += 1
    return i


def _tokens(text: str, subs: list[str]) -> list[tuple[str, str]]:
    """("word", text) and ("op", char) tokens of shell ``text``; the bodies of ``$(...)`` and backticks
    go to ``subs`` (they are commands too); redirections and their targets are dropped."""
    tokens: list[tuple[str, str]] = []
    word: list[str] = []
    redirect = False
    i = 0

    def end_word() -> None:
        nonlocal redirect
        if word:
            if not redirect:
                tokens.append(("word", "".join(word)))
            redirect = False
            word.clear()

    while i < len(text):
        c = text[i]
        if c == "\\":
            if text[i + 1:i + 2] != "\n":      # a backslash-newline joins lines
                word.append(text[i + 1:i + 2])
            i += 2
        elif c == "#" and not word:
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif c in " \t\r":
            end_word()
            i += 1
        elif c in "<>":
            end_word()
            i += 1
            while i < len(text) and text[i] in "<>&":
                i += 1
            if text[i - 1] == "&" and text[i:i + 1].isdigit():   # >&2
                i += 1
            elif text[i - 1] != "&":
                redirect = True    # the next word is a file
        elif c in OPERATORS:
            end_word()
            tokens.append(("op", c))
            i += 1
        elif c == "'":
            j = text.find("'", i + 1)
            j = len(text) if j < 0 else j
            word.append(text[i + 1:j])
            i = j + 1
        elif c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                if text[j] == "\\":
                    j += 1
                elif text[j:j + 2] == "$(" and text[j + 2:j + 3] != "(":
                    k = _closing(text, j + 2)
                    subs.append(text[j + 2:k - 1])
                    j = k - 1
                j += 1
            word.append("$" + text[i + 1:j])
            i = j + 1
        elif text[i:i + 2] == "$(":
            k = _closing(text, i + 2)
            if text[i + 2:i + 3] != "(":
                subs.append(text[i + 2:k - 1])
            word.append("$(...)")
            i = k
        elif text[i:i + 2] == "${":
            j = text.find("}", i)
            word.append(text[i:j + 1] if j > 0 else text[i:])
            i = j + 1 if j > 0 else len(text)
        elif c == "`":
            j = text.find("`", i + 1)
            j = len(text) if j < 0 else j
            subs.append(text[i + 1:j])
            word.append("$`")
            i = j + 1
        else:
            word.append(c)
            i += 1
    end_word()
    return tokens


def shell_functions(text: str) -> set[str]:
    tokens = _tokens(_HEREDOC.sub("\n", text), [])
    return {tokens[i][1] for i in range(len(tokens) - 2)
            if tokens[i][0] == "word" and tokens[i + 1] == ("op", "(") and tokens[i + 2] == ("op", ")")}


def shell_programs(text: str, functions: frozenset[str] = frozenset()) -> list[str]:
    """The words in command position: after a newline, ``;``, ``&&``, ``||``, ``|``, ``(``, inside
    ``$(...)`` or after a keyword such as ``then``; not shell functions, builtins, assignments, case
    patterns, heredoc bodies or paths inside the repository."""
    subs: list[str] = []
    tokens = _tokens(_HEREDOC.sub("\n", text), subs)
    functions = functions | shell_functions(text)     # with those of the files it sources
    found: list[str] = []
    command, skip_to, case_depth = True, None, 0
    i = 0
    while i < len(tokens):
        kind, tok = tokens[i]
        i += 1
        if kind == "op":
            if tok == "(" and i >= 2 and tokens[i - 2][1].endswith("="):
                depth = 1       # an array: name=( ... )
                while i < len(tokens) and depth:
                    depth += (tokens[i] == ("op", "(")) - (tokens[i] == ("op", ")"))
                    i += 1
                continue
            command = tok != ")" and (tok in ";&|(\n" or command) or tokens[i - 2:i] == [("op", "("), ("op", ")")]
            continue
        if skip_to is not None:
            if tok == skip_to:
                skip_to, command = None, True
            continue
        if not command:
            continue
        if case_depth:
            j = i
            while j < len(tokens) and tokens[j][1] != ")" and (tokens[j] == ("op", "|") or tokens[j][0] == "word"):
                j += 1
            if j < len(tokens) and tokens[j] == ("op", ")") and all(
                    t == ("op", "|") or t[0] == "word" for t in tokens[i:j]):
                i = j + 1       # a case pattern: -h|--help)
                continue
        if tok in ("for", "select", "case"):
            case_depth += tok == "case"
            skip_to = "in" if tok == "case" else "do"
            continue
        if tok in ("esac", "fi", "done", "}"):
            case_depth -= tok == "esac"
            command = False
            continue
        if tok in ("if", "then", "else", "elif", "while", "until", "do", "!", "{", "time"):
            continue
        if re.match(r"^\w+(\[[^]]*\])?\+?=", tok):
            continue        # an assignment before the command
        command = False
        if tok == "command" or tok in functions or tok in SHELL_WORDS - WRAPPERS - {"timeout"}:
            continue
        if tok in WRAPPERS or tok == "timeout":
            if tok != "exec":
                found.append(tok)
            command = True
            while i < len(tokens) and tokens[i][0] == "word" and (
                    tokens[i][1].startswith("-") or "=" in tokens[i][1]          # its options, env's NAME=value
                    or tok == "env" and tokens[i - 1][1] == "-u"
                    or tok == "timeout" and tokens[i][1][:1].isdigit()):
                i += 1
            continue
        if "$" in tok or ("/" in tok and not ABSOLUTE_PROGRAM.match(tok)):
            continue        # a variable, or a file of the repository
        found.append(tok)
    for sub in subs:
        found += shell_programs(sub, functions)
    return found


# -- what each script that prepares a machine installs ---------------------------------------------


def installed_by(script: str) -> set[str]:
    """The Debian packages a setup script installs: its ``*pkgs=( ... )`` arrays and the literal
    arguments of its ``apt-get install`` lines."""
    text = "\n".join(line.split(" #")[0] for line in (ROOT / script).read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    packages: set[str] = set()
    for body in re.findall(r"\b\w*pkgs=\(([^)]*)\)", text):
        packages.update(w for w in body.split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", w))
    for args in re.findall(r"apt-get\s+install\s+([^\n;&|>]*)", re.sub(r'"[^"]*"', "", text)):
        packages.update(w for w in args.split() if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", w))
    return packages


# -- the sources and what they run --------------------------------------------------------------------


def _sources(suffix: str) -> list[Path]:
    skip = {".venv", "build", "node_modules", "__pycache__"}
    return sorted(p for p in ROOT.rglob(f"*{suffix}")
                  if not skip & set(p.relative_to(ROOT).parts)
                  and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def shell_scripts() -> list[Path]:
    found = set(_sources(".sh"))
    for d in ("scripts", ".ci"):
        found.update(p for p in (ROOT / d).glob("*") if p.is_file()
                     and re.match(rb"#!(/usr/bin/env |/bin/|/usr/bin/)(ba)?sh\b", p.read_bytes()[:40]))
    return sorted(found)


def programs_by_scope() -> dict[str, dict[str, list[str]]]:
    """{scope: {program: [where it is run, ...]}}"""
    scopes: dict[str, dict[str, list[str]]] = {"setup": {}, "vm": {}}
    for path in _sources(".py"):
        for program in python_programs(path):
            scopes["setup"].setdefault(program, []).append(str(path.relative_to(ROOT)))
    functions = frozenset().union(*(shell_functions(p.read_text()) for p in shell_scripts()))
    for path in shell_scripts():
        rel = str(path.relative_to(ROOT))
        if rel in ELSEWHERE:
            continue
        for program in shell_programs(path.read_text(), functions):
            scopes["vm" if VM_SCRIPTS.match(rel) else "setup"].setdefault(program, []).append(rel)
    return scopes


# -- dpkg ----------------------------------------------------------------------------------------------


def owners(paths: set[str]) -> dict[str, set[str]]:
    """{path: the packages that ship it}, for the paths any package ships (one dpkg -S for all)."""
    out = subprocess.run(["dpkg", "-S", *sorted(paths)], capture_output=True, text=True, timeout=120).stdout
    found: dict[str, set[str]] = {}
    for line in out.splitlines():
        if ": " in line and not line.startswith(("diversion ", "local diversion")):
            packages, path = line.split(": ", 1)
            found.setdefault(path, set()).update(p.strip().split(":")[0] for p in packages.split(","))
    return found


def _chain(path: str) -> list[str]:
    """The path, each link it goes through (alternatives included) and the /usr-merged spellings."""
    seen: list[str] = []
    p = path
    for _ in range(10):
        if p in seen:
            break
        seen.append(p)
        if not os.path.islink(p):
            break
        p = os.path.join(os.path.dirname(p), os.readlink(p))
        p = os.path.normpath(p)
    seen.append(os.path.realpath(path))
    merged = [q[4:] if q.startswith("/usr/") else "/usr" + q for q in seen]
    return [*seen, *merged]


def where(program: str) -> str | None:
    path = program if program.startswith("/") else shutil.which(
        program, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]))
    return path if path is not None and os.path.exists(path) else None


def in_venv(path: str) -> bool:
    return Path(path).resolve().is_relative_to(VENV_BIN.resolve()) or Path(path).parent == VENV_BIN


def with_dependencies(packages: set[str]) -> set[str]:
    """The packages and what they Depend or Pre-Depend on: apt installs those too (python3 brings
    /usr/bin/python3 in python3-minimal).  One level: a program may not hide two steps away."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}\n", *sorted(packages)],
                         capture_output=True, text=True, timeout=30).stdout
    deps = {alt.split()[0].split(":")[0] for clause in out.replace("\n", ",").split(",") if clause.strip()
            for alt in clause.split("|")}
    return packages | deps


def problems(programs: dict[str, list[str]], allowed: set[str]) -> list[str]:
    """Each program that is not installed, or whose file (or a link on its way to it) no allowed package
    ships."""
    paths = {program: where(program) for program in programs}
    shipped = owners({link for path in paths.values() if path and not in_venv(path) for link in _chain(path)})
    found = []
    for program, sites in sorted(programs.items()):
        path = paths[program]
        run_by = ", ".join(sorted(set(sites))[:3])
        if path is None:
            found.append(f"{program} (run by {run_by}) is not installed on this machine")
        elif not in_venv(path):
            packages = set().union(*(shipped.get(link, set()) for link in _chain(path)))
            if not packages & allowed:
                found.append(f"{program} (run by {run_by}) is {path} from "
                             f"{', '.join(sorted(packages)) or 'no package'}, which no setup script installs")
    return found


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian system: dpkg -S is the check")


@needs_dpkg
def test_every_program_the_code_the_tests_and_setup_run_comes_from_a_package_setup_installs():
    programs = programs_by_scope()["setup"]
    assert {"ip", "nsenter"} <= programs.keys()      # the scan sees the lab's own argvs
    allowed = with_dependencies(set().union(*map(installed_by, INSTALLERS["setup"]))) | set(BASE_PACKAGES)
    assert problems(programs, allowed) == []


@needs_dpkg
def test_every_program_the_vm_scripts_run_comes_from_setup_or_vm_deps():
    vm_deps = installed_by("scripts/vm-deps.sh")
    missing = [p for p in sorted(vm_deps) if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
                                                            capture_output=True, text=True).stdout
               != "install ok installed"]
    if missing:
        pytest.skip(f"make vm-deps has not run here ({', '.join(missing)} missing): cannot trace the VM scripts")
    allowed = with_dependencies(set().union(*map(installed_by, INSTALLERS["vm"]))) | set(BASE_PACKAGES)
    assert problems(programs_by_scope()["vm"], allowed) == []


@needs_dpkg
def test_each_base_package_the_check_accepts_is_essential_or_required_here():
    for package, reason in BASE_PACKAGES.items():
        out = subprocess.run(["dpkg-query", "-W", "-f=${Essential} ${Priority}", package],
                             capture_output=True, text=True).stdout
        assert out.startswith("yes") or out.endswith("required"), f"{package} ({reason}) is {out!r} here"


def test_the_shell_scan_finds_commands_and_skips_functions_builtins_and_patterns():
    script = """#!/bin/bash
say() { printf '%s\\n' "$*"; }
pkgs=(not-a-command other)
case $x in
  -h|--help) usage ;;
  trixie) number=13 ;;
esac
for p in "${pkgs[@]}"; do dpkg-query -W "$p" | grep -q ok || missing+=("$p"); done
kver=$(uname -r)   # comment mentioning rm
if ! mountpoint -q /sys/fs/bpf; then mount -t bpf bpf /sys/fs/bpf && say done; fi
"$venv/bin/python" - <<'PY'
import nothing
PY
exec sudo -n iptables -S
"""
    assert sorted(shell_programs(script)) == ["dpkg-query", "grep", "iptables", "mount", "mountpoint", "sudo",
                                              "uname", "usage"]


def test_the_python_scan_finds_argvs_passed_named_looped_and_wrapped(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("""
import subprocess, sys
def nsenter_argv(ns, argv):
    return ["nsenter", f"--net={ns}", "--", *argv]
def f(lab, cpu):
    subprocess.run(["ip", "netns", "exec", "x", "ethtool", "-k"])
    for tool, a in (("iptables", 1), ("ip6tables", 2)):
        lab.run("ns", [tool, "-S"])
    argv = ["taskset", "-c", str(cpu), "prometheus"]
    lab.popen("ns", argv)
    subprocess.run([*prefix, "unshare", "-m", "sh", "-c", f"mount -t sysfs sysfs /sys && echo {cpu} > /x"])
    subprocess.run([sys.executable, "-m", "x"])
    for argv in (["ss", "-Hnau"], ["bridge", "link"]):
        lab.run("ns", argv)
    CHROMIUM = "/usr/bin/chromium"
""")
    assert python_programs(source) == {"nsenter", "ip", "ethtool", "iptables", "ip6tables", "taskset",
                                       "prometheus", "unshare", "sh", "mount", "ss", "bridge", "/usr/bin/chromium"}
