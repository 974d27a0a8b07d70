"""Plain size measures of the package: module lines, function lines, the share over 40.

    python benchmarks/code_size.py             # measures of throttler/
    python benchmarks/code_size.py --all       # also every function over 40 lines and the ten longest

A function's length is its source lines from ``def`` (decorators included) to
its last line, nested functions counted in their parent too (and measured on
their own). Limits checked: no module over 700 lines, no function over 60,
at most 5% of functions over 40. Exit status 1 when a limit is broken.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MODULE_LIMIT_LINES = 700
FUNCTION_LIMIT_LINES = 60
LONG_FUNCTION_LINES = 40
LONG_FUNCTION_SHARE = 0.05


def functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append((f"{prefix}{child.name}", child.end_lineno - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
    visit(tree, "")
    return out


def measure(root: Path) -> dict:
    modules = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(root.rglob("*.py"))}
    funcs = [(p, name, n) for p in modules for name, n in functions(p)]
    return {"modules": modules, "functions": funcs}


def report(root: Path, show_all: bool) -> bool:
    m = measure(root)
    base = root.parent
    modules, funcs = m["modules"], m["functions"]
    big_modules = [(p, n) for p, n in modules.items() if n > MODULE_LIMIT_LINES]
    over_limit = [f for f in funcs if f[2] > FUNCTION_LIMIT_LINES]
    long = sorted((f for f in funcs if f[2] > LONG_FUNCTION_LINES), key=lambda f: -f[2])
    share = len(long) / len(funcs) if funcs else 0.0
    largest = max(modules.items(), key=lambda kv: kv[1])
    print("| measure | value | limit | ok |\n|---|---|---|---|")
    print(f"| modules | {len(modules)} | | |")
    print(f"| largest module | {largest[1]} lines ({largest[0].relative_to(base)}) | {MODULE_LIMIT_LINES} | "
          f"{'yes' if not big_modules else 'NO'} |")
    print(f"| modules over {MODULE_LIMIT_LINES} lines | {len(big_modules)} | 0 | {'yes' if not big_modules else 'NO'} |")
    print(f"| functions | {len(funcs)} | | |")
    print(f"| longest function | {long[0][2] if long else max((f[2] for f in funcs), default=0)} lines | "
          f"{FUNCTION_LIMIT_LINES} | {'yes' if not over_limit else 'NO'} |")
    print(f"| functions over {FUNCTION_LIMIT_LINES} lines | {len(over_limit)} | 0 | {'yes' if not over_limit else 'NO'} |")
    print(f"| functions over {LONG_FUNCTION_LINES} lines | {len(long)} ({share:.1%}) | "
          f"{LONG_FUNCTION_SHARE:.0%} | {'yes' if share <= LONG_FUNCTION_SHARE else 'NO'} |")
    for p, n in big_modules:
        print(f"module over {MODULE_LIMIT_LINES}: {p.relative_to(base)} ({n} lines)")
    if show_all or over_limit:
        print(f"\nfunctions over {LONG_FUNCTION_LINES} lines:" + ("" if long else " none"))
        for p, name, n in long:
            print(f"  {n:4d}  {p.relative_to(base)}:{name}")
    if show_all:
        print("\nthe ten longest functions:")
        for p, name, n in sorted(funcs, key=lambda f: -f[2])[:10]:
            print(f"  {n:4d}  {p.relative_to(base)}:{name}")
    return not big_modules and not over_limit and share <= LONG_FUNCTION_SHARE


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / "throttler"))
    p.add_argument("--all", action="store_true", help="list every function over 40 lines")
    args = p.parse_args(argv)
    return 0 if report(Path(args.root), args.all) else 1


if __name__ == "__main__":
    sys.exit(main())
