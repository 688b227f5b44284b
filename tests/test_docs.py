"""The pages a newcomer reads stay true: every relative link of README.md and docs/ resolves (file and
heading), README's "start reading at FILE:N (NAME)" pointers land on NAME's definition, README stays a
ten-minute page, and the project speaks of itself only."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def _prose(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", _prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for url in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"^[a-z]+:", url):
            continue
        path, _, frag = url.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{url}: no such file")
        elif frag and (target.suffix != ".md" or frag not in _anchors(target)):
            bad.append(f"{url}: no such heading")
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


def _definitions(path: Path) -> dict[str, int]:
    """Each class and function of a module by qualified name (Class.method) -> the line of its def."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[prefix + child.name] = child.lineno
                if isinstance(child, ast.ClassDef):
                    walk(child, prefix + child.name + ".")

    walk(ast.parse(path.read_text(encoding="utf-8")), "")
    return out


def test_readme_points_at_the_definitions_it_names():
    refs = re.findall(r"`(\w+\.py):(\d+)` \(`([\w.]+)`\)", (ROOT / "README.md").read_text())
    assert len(refs) >= 10, "README's 'where each idea lives' table lost its FILE:N pointers"
    wrong = []
    for file, line, name in refs:
        where = _definitions(ROOT / file)
        if where.get(name) != int(line):
            wrong.append(f"{file}:{line} is not {name} (at line {where.get(name)})")
    assert not wrong, "update README's line numbers: " + "; ".join(wrong)


def test_readme_is_a_ten_minute_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 30_000 and len(text.splitlines()) <= 350


def test_the_project_speaks_of_itself_only():
    files = PAGES + sorted(ROOT.glob("*.py")) + sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    pattern = re.compile(r"earlier\ssession|\bissue\s[0-9]+|\bstop\s[0-9]+", re.I)  # \s: this file passes too
    hits = [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for f in files
            for m in pattern.finditer(f.read_text(encoding="utf-8"))]
    assert not hits, hits


MODULES = ("data", "fp8", "model", "muon", "mup", "runtime", "train")
ALLOWED = {"data": {"runtime"}, "fp8": set(), "model": {"fp8"}, "muon": set(), "mup": {"model"},
           "runtime": set(), "train": {"data", "model", "mup", "muon", "runtime"}}  # docs/ARCHITECTURE.md


def _project_imports(path: Path) -> tuple[set[str], list[str]]:
    """The project modules a file imports (at any depth, lazy imports too) and the private names it reaches
    in them (`module._name`, `from module import _name`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported, aliases, private = set(), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in MODULES or top == "tools":
                    imported.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in MODULES or top == "tools":
                imported.add(node.module)
                for a in node.names:
                    if a.name.startswith("_"):
                        private.append(f"from {node.module} import {a.name}")
                    elif top == "tools" and node.module == "tools":
                        aliases[a.asname or a.name] = f"tools.{a.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    return imported, private


def test_imports_run_one_way():
    wrong = []
    for name in MODULES:
        imported, _ = _project_imports(ROOT / f"{name}.py")
        extra = {m.split(".")[0] for m in imported} - ALLOWED[name]
        if extra:
            wrong.append(f"{name}.py imports {sorted(extra)}")
    for path in sorted((ROOT / "tools").glob("*.py")):
        _, private = _project_imports(path)
        if private:
            wrong.append(f"tools/{path.name} uses private names {sorted(set(private))}")
    assert not wrong, "docs/ARCHITECTURE.md's rules: " + "; ".join(wrong)
