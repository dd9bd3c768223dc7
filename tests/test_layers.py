"""The layers of python/gally, read from the source: library modules know nothing of the command
line (argparse lives in gally/cli/ and gally/bench/cli.py), and
the folder tokenizer does not depend on the GGUF tokenizer builder."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "gally"
CLI_FILES = ("bench/cli.py", "__main__.py")  # and everything in cli/


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of what `path` imports: modules, and pkg.name for `from pkg import name`."""
    package = ["gally", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def library_modules() -> list[pathlib.Path]:
    relative = [p.relative_to(PACKAGE) for p in sorted(PACKAGE.rglob("*.py"))]
    return [PACKAGE / p for p in relative if p.parts[0] != "cli" and p.as_posix() not in CLI_FILES]


def test_imported_modules_resolves_relative_imports():
    names = imported_modules(PACKAGE / "bench" / "peer_gguf.py")
    assert {"gally.safetensors_file", "gally.gguf_names.permute_rows", "gally.bench.derived", "numpy"} <= names


def test_library_modules_know_nothing_of_the_command_line():
    modules = library_modules()
    assert PACKAGE / "quantize.py" in modules and PACKAGE / "bench" / "run.py" in modules
    assert not [str(p) for p in modules if "argparse" in imported_modules(p)]


def test_tokenizer_does_not_import_the_gguf_tokenizer():
    assert not any(n.startswith("gally.gguf_tokenizer") for n in imported_modules(PACKAGE / "tokenizer.py"))
    assert "gally.tokenizer.END_OF_TURN_TOKENS" in imported_modules(PACKAGE / "gguf_tokenizer.py")
