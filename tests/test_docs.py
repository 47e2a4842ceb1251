"""The documentation works as written: every `dyc` command and option it names exists (runnable example lines
parse with the real CLI), every Python block compiles and its imports resolve, the C++ example compiles against
the public header, and every relative link points inside the repository. The Python examples of README.md and
docs/runtime.md run in tests/test_readme.py and tests/test_runtime_docs.py, docs/bundle.md's here."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from dyc.cli import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "DESIGN.md", *sorted((REPO / "docs").glob("*.md"))]
ALL_MD = sorted(p for p in REPO.rglob("*.md") if not any(part.startswith(".") or part in ("build", "node_modules")
                                                         for part in p.relative_to(REPO).parts))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SYNOPSIS = re.compile(r"[\[{…|<]|\.\.\.")  # a usage line with placeholders, not a runnable one
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def blocks(path: Path, *langs: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(path.read_text()) if m.group(1) in langs]


def dyc_commands() -> list[tuple[str, str]]:
    """(where, command text) of every `dyc …` in shell blocks and inline code of the docs (inline ones are
    marked with backquotes in ``where``: they are references, checked for their options only)."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for block in blocks(path, "bash", "sh", ""):
            for line in block.replace("\\\n", " ").splitlines():
                for seg in re.split(r"&&|;|\|\|", line):
                    seg = seg.split(" #", 1)[0].strip()
                    first = seg.split(" ", 1)[0]
                    if first and Path(first).name == "dyc":
                        out.append((f"{path.name}: {seg}", seg))
        for span in re.findall(r"`(dyc [a-z][^`]*)`", FENCE.sub("", text)):
            out.append((f"{path.name}: `{span}`", span))
    return out


COMMANDS = dyc_commands()


def test_docs_name_commands():
    assert len(COMMANDS) > 30 and any("build-engines" in c for _, c in COMMANDS)


@pytest.mark.parametrize("where,text", COMMANDS, ids=[w[:80] for w, _ in COMMANDS])
def test_every_documented_command_and_option_exists(where, text):
    tokens = text.split()
    name = tokens[1]
    if name.startswith("-"):  # `dyc --help`, `dyc --version`
        assert name in ("--help", "-h", "--version"), where
        return
    cmd = cli.commands.get(name)
    assert cmd is not None, f"{where}: no command `dyc {name}`"
    known = {"--help", "-h"}
    for p in cmd.params:
        known.update(getattr(p, "opts", []))
        known.update(getattr(p, "secondary_opts", []))
    rest = text.split(name, 1)[1]
    for opt in OPTION.findall(rest):
        assert opt in known, f"{where}: `dyc {name}` has no option {opt}"
    if "`" not in where and not SYNOPSIS.search(rest):  # a runnable line: the parser accepts it (values, arity)
        args = shlex.split(rest)
        try:
            with cmd.make_context(f"dyc {name}", args) as ctx:
                assert ctx.params is not None
        except click.UsageError as e:
            pytest.fail(f"{where}: {e.format_message()}")


def test_python_blocks_compile_and_import():
    for path in DOCS:
        for code in blocks(path, "python"):
            tree = ast.parse(code, filename=str(path))  # SyntaxError fails the test
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    mod = __import__(node.module, fromlist=[a.name for a in node.names])
                    for a in node.names:
                        assert hasattr(mod, a.name) or __import__(f"{node.module}.{a.name}"), (path.name, a.name)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        __import__(a.name)


def test_bundle_md_loading_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from runtime_fixtures import compile_tame

    c = compile_tame(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xl.dyc").symlink_to(c["bundle"])  # the name the example uses
    (code,) = blocks(REPO / "docs" / "bundle.md", "python")
    exec(compile(code, "docs/bundle.md", "exec"), {})


def test_cpp_example_compiles_against_the_header(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (code,) = blocks(REPO / "docs" / "cpp.md", "cpp")
    src = tmp_path / "example.cpp"
    src.write_text(code)
    p = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{REPO / 'engines' / 'include'}", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _slug(heading: str) -> str:  # GitHub's anchors: lower case, punctuation dropped, spaces -> '-'
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_stay_inside_the_repository():
    bad = []
    for path in ALL_MD:
        text = FENCE.sub("", path.read_text())
        anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # http(s), mailto
                continue
            file, _, anchor = target.partition("#")
            if not file:
                if anchor not in anchors:
                    bad.append(f"{path.relative_to(REPO)}: #{anchor} is no heading")
                continue
            dest = (path.parent / file).resolve()
            if not dest.is_relative_to(REPO) or not dest.exists():
                bad.append(f"{path.relative_to(REPO)}: {target}")
    assert not bad, "links that leave the repository or point nowhere:\n" + "\n".join(bad)
