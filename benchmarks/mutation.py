"""Mutation testing (mutmut) of the modules where a silent error changes a reported number.

mutmut changes the code one small thing at a time (`<` to `<=`, `+` to `-`, a constant plus one,
`and` to `or`, an argument dropped, a string changed) and, for each such mutant, runs the quick unit
tests that call the changed function. A mutant that fails a test is killed; one that passes every
test survived: a change to that line that no test notices. The modules and the tests are
`[tool.mutmut]` in pyproject.toml; why those, and how to read the result: docs/mutation.md.

    pip install -e ".[test,mutation]"
    python benchmarks/mutation.py                                 # every module, a worker per core
    python benchmarks/mutation.py --modules answers report.checks --workers 2   # a quick check
    python benchmarks/mutation.py --list                          # the modules and what is mutated

Per module: mutants, killed, survived (and how many of those change only a string literal), timeout, no
tests (no selected test calls the function), other (suspicious, segfault), score; the overall
score; each surviving mutant with its file:line and diff. mutmut's work tree is mutants/ (removed
first unless --reuse). Prints the table and writes JSON (device, date, versions, git commit,
command, CPU count) + Markdown to benchmarks/results/mutation_cpu_<N>_cores.{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _common import RESULTS, ROOT, earlier_points, merged, read_results, results_path, run_meta, write_pair

WORK = ROOT / "mutants"  # mutmut's work tree (mutated copies, its test stats, its verdicts)
LOG = "mutmut-run.log"  # mutmut's output, in WORK

# [tool.mutmut] only_mutate names whole files; of these, only some functions are in scope (as
# mutmut names them: x_<function> or xǁ<class>ǁ<method>). Every other file is mutated whole.
SCOPES = {
    "firstsight/tasks/distill.py": ("xǁKDStepǁ*", "x_step_inputs*"),  # the KD step, not the recipe
    "firstsight/core/files.py": ("x_content_key*",),  # the teacher cache's hash, not the file helpers
}
SLOW_TEST_S = 5.0  # a selected test slower than this (mutmut's own timing) is named in the results

# mutmut's verdicts (mutmut.stats.status_by_exit_code) in the table's columns
OTHER = ("suspicious", "segfault", "check was interrupted by user", "caught by type check")


@dataclass(frozen=True)
class Module:
    path: str  # firstsight/losses/kd.py
    functions: Tuple[str, ...]  # mutant-name patterns inside the module; ("*",) for all of it

    @property
    def dotted(self) -> str:
        return self.path[: -len(".py")].replace("/", ".")

    @property
    def name(self) -> str:  # losses.kd
        return self.dotted.removeprefix("firstsight.")

    @property
    def patterns(self) -> List[str]:
        return [f"{self.dotted}.{f}" for f in self.functions]

    @property
    def scope(self) -> str:
        if self.functions == ("*",):
            return "all"
        return ", ".join(_readable(f.rstrip("*")) for f in self.functions)

    def covers(self, mutant: str) -> bool:
        return any(fnmatch.fnmatchcase(mutant, p) for p in self.patterns)


def _readable(key: str) -> str:
    """x_step_inputs -> step_inputs, xǁKDStepǁ -> KDStep, xǁKDStepǁ__call__ -> KDStep.__call__."""
    if key.startswith("xǁ"):
        return ".".join(part for part in key[2:].split("ǁ") if part)
    return key.removeprefix("x_")


def mutmut_config() -> Dict[str, Any]:
    try:
        from tomllib import loads
    except ImportError:  # Python 3.10: toml, which mutmut brings and reads it with there
        from toml import loads
    return loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def modules_in_config(config: Dict[str, Any]) -> List[Module]:
    return [Module(path, SCOPES.get(path, ("*",))) for path in config["only_mutate"]]


def select(modules: List[Module], wanted: Optional[Sequence[str]]) -> List[Module]:
    """The modules named in `wanted` (each a dotted name or its tail: answers, report.checks,
    firstsight.losses.kd); all of them when None."""
    if not wanted:
        return modules
    chosen: List[Module] = []
    for word in wanted:
        hits = [m for m in modules if m.dotted == word or m.dotted.endswith("." + word)]
        if len(hits) != 1:
            names = ", ".join(m.name for m in (hits or modules))
            raise SystemExit(f"--modules {word}: {'ambiguous' if hits else 'no such module'}; choose from {names}")
        if hits[0] not in chosen:
            chosen.append(hits[0])
    return chosen


# -------------------------------------------------------------------------------- running mutmut


def run_mutmut(patterns: List[str], workers: int, threads: int, reuse: bool) -> Tuple[int, float]:
    """`mutmut run --max-children <workers> <patterns>` in the checkout: its exit code and wall time.
    Its output goes to mutants/mutmut-run.log; its progress line is echoed every 30 s."""
    executable = shutil.which("mutmut", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if executable is None:
        raise SystemExit('mutmut is not installed: pip install -e ".[test,mutation]"')
    if not reuse and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # one thread per worker: the workers are the parallelism, and torch's thread pool in the
        # process mutmut forks its workers from would be copied into each of them
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    command = [executable, "run", "--max-children", str(workers), *patterns]
    began = time.perf_counter()
    last_echo = began
    status = ""
    with open(WORK / LOG, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        buffer = ""
        while True:
            chunk = proc.stdout.read1(65536).decode(errors="replace")  # type: ignore[attr-defined]
            if not chunk:
                break
            log.write(chunk)
            buffer += chunk
            *parts, buffer = re.split(r"[\r\n]", buffer)
            for part in parts:
                text = part.strip()
                if re.match(r"^\S?\s*\d+/\d+\s", text):  # the progress line: done/total and the verdicts
                    status = text
                elif text.startswith(("done in", "Running mutation testing", "Found ", "Removed ")) or "rror" in text:
                    print(f"[{time.perf_counter() - began:6.0f} s] {text}", flush=True)
            if status and time.perf_counter() - last_echo > 30:
                print(f"[{time.perf_counter() - began:6.0f} s] {status}", flush=True)
                last_echo = time.perf_counter()
        code = proc.wait()
    return code, time.perf_counter() - began


# -------------------------------------------------------------------------------- reading the verdicts


def verdicts(module: Module) -> Dict[str, Tuple[str, Optional[float]]]:
    """mutant name -> (mutmut's status, seconds its tests took) for the module's mutants in scope."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((WORK / f"{module.path}.meta").read_text())
    durations = meta.get("durations_by_key", {})
    return {
        name: (status_by_exit_code[code], durations.get(name))
        for name, code in meta["exit_code_by_key"].items()
        if module.covers(name)
    }


def function_of(mutant: str) -> Tuple[Optional[str], str]:
    """(class or None, function) of a mutant name such as ...x_parse_choice__mutmut_3 or ...xǁKDStepǁ__call__."""
    key = mutant.partition("__mutmut_")[0].rpartition(".")[2]
    if key.startswith("xǁ"):
        _, cls, func = key.split("ǁ")
        return cls, func
    return None, key.removeprefix("x_")


def function_span(tree: ast.Module, cls: Optional[str], func: str) -> Optional[Tuple[int, int]]:
    body = tree.body
    if cls is not None:
        owner = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        body = owner.body if owner else []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return first, node.end_lineno or node.lineno
    return None


def located(path: str, mutant: str, diff: str, source: List[str], tree: ast.Module) -> Optional[int]:
    """The file line of the mutant's first changed line: its diff is of the function alone, so the
    hunk's unchanged and removed lines are looked up in the function's lines of the file."""
    cls, func = function_of(mutant)
    span = function_span(tree, cls, func)
    if span is None:
        return None
    lines = diff.splitlines()
    hunk = next((i for i, line in enumerate(lines) if line.startswith("@@")), None)
    if hunk is None:
        return None
    old = [line[1:].strip() for line in lines[hunk + 1 :] if line[:1] in (" ", "-")]
    changed = [line[:1] for line in lines[hunk + 1 :] if line[:1] in (" ", "-")].index("-")
    first, last = max(1, span[0] - 20), span[1]  # comments above a function belong to its text
    for start in range(first, last + 1):
        if [s.strip() for s in source[start - 1 : start - 1 + len(old)]] == old:
            return start + changed
    return None


def string_only(diff: str) -> bool:
    """Whether the mutant changes nothing but the contents of string literals (a message, a label)."""

    def tokens(side: str) -> List[Tuple[int, str]]:
        body = [line[1:].strip() for line in diff.splitlines()[2:] if line[:1] == side]
        found: List[Tuple[int, str]] = []
        try:
            for tok in tokenize.generate_tokens(io.StringIO("\n".join(body) + "\n").readline):
                found.append((tok.type, tok.string))
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass  # a line of a longer statement: the tokens read so far
        return found

    old, new = tokens("-"), tokens("+")
    if len(old) != len(new) or old == new:
        return False
    return all(a == b or (a[0] == b[0] == tokenize.STRING) for a, b in zip(old, new))


def tests_by_module(modules: List[Module]) -> Tuple[Dict[str, int], List[Tuple[str, float]]]:
    """How many selected tests call each module's functions in scope (mutmut's stats), and the
    selected tests slower than SLOW_TEST_S."""
    stats_file = WORK / "mutmut-stats.json"
    if not stats_file.is_file():
        return {}, []
    stats = json.loads(stats_file.read_text())
    counts = {}
    for m in modules:
        tests = set()
        for function, names in stats["tests_by_mangled_function_name"].items():
            if any(fnmatch.fnmatchcase(function + "__mutmut_1", p) for p in m.patterns):
                tests.update(names)
        counts[m.name] = len(tests)
    slow = sorted(
        ((name, round(s, 2)) for name, s in stats["duration_by_test"].items() if s > SLOW_TEST_S), key=lambda x: -x[1]
    )
    return counts, slow


def module_point(module: Module, tests: Optional[int]) -> Dict[str, Any]:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    found = verdicts(module)
    count = {s: 0 for s in ("killed", "survived", "timeout", "no tests", "skipped", "not checked", *OTHER)}
    for status, _ in found.values():
        count[status] = count.get(status, 0) + 1
    source_text = (ROOT / module.path).read_text()
    source, tree = source_text.splitlines(), ast.parse(source_text)
    survivors, unreached = [], []
    for name in sorted(found, key=_natural):
        status, _ = found[name]
        if status not in ("survived", "no tests"):
            continue
        try:
            diff = get_diff_for_mutant(name, path=module.path)
        except Exception as err:  # noqa: BLE001 - a mutant whose diff cannot be read is still listed
            diff = f"(no diff: {type(err).__name__}: {err})"
        entry = {
            "mutant": name.rpartition(".")[2],
            "function": ".".join(p for p in function_of(name) if p),
            "line": located(module.path, name, diff, source, tree),
            "string_only": string_only(diff),
            "diff": diff,
        }
        (survivors if status == "survived" else unreached).append(entry)
    tested = len(found) - count["skipped"] - count["not checked"]
    caught = count["killed"] + count["timeout"]
    return {
        "module": module.name,
        "path": module.path,
        "scope": module.scope,
        "tests": tests,
        "mutants": len(found),
        "killed": count["killed"],
        "survived": count["survived"],
        "survived_string_only": sum(s["string_only"] for s in survivors),
        "timeout": count["timeout"],
        "no_tests": count["no tests"],
        "other": sum(count[s] for s in OTHER),
        "not_checked": count["not checked"] + count["skipped"],
        "score": caught / tested if tested else None,
        "mutant_seconds": round(sum(d or 0.0 for _, d in found.values()), 1),
        "survivors": survivors,
        "no_tests_mutants": unreached,
    }


def _natural(name: str) -> Tuple[str, int]:
    head, _, number = name.partition("__mutmut_")
    return head, int(number) if number.isdigit() else 0


def overall(points: List[Dict[str, Any]]) -> Dict[str, Any]:
    keys = ("mutants", "killed", "survived", "survived_string_only", "timeout", "no_tests", "other", "not_checked")
    total = {k: sum(p[k] for p in points) for k in keys}
    tested = total["mutants"] - total["not_checked"]
    total["score"] = (total["killed"] + total["timeout"]) / tested if tested else None
    return total


# -------------------------------------------------------------------------------- tables


def _pct(score: Optional[float]) -> str:
    return "—" if score is None else f"{100 * score:.1f} %"


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _change(diff: str) -> Tuple[str, str]:
    body = diff.splitlines()[2:]
    old = " / ".join(line[1:].strip() for line in body if line.startswith("-"))
    new = " / ".join(line[1:].strip() for line in body if line.startswith("+"))
    return old, new


def _where(point: Dict[str, Any], entry: Dict[str, Any]) -> str:
    return f"{point['path']}:{entry['line'] or '?'}"


def markdown(data: Dict[str, Any]) -> str:
    points, total = data["points"], data["overall"]
    versions = data.get("versions", {})
    lines = [
        f"# Mutation testing — {data['host_cpus']}-core CPU",
        "",
        f"{data['date']}; git commit `{data.get('commit') or 'unknown'}`; `{data['command']}`; "
        f"python {data['python']}, torch {versions.get('torch', '?')}, mutmut {versions.get('mutmut', '?')}; "
        f"{data['workers']} workers; {data['seconds']:.0f} s.",
        "",
        "| module | mutated | tests | mutants | killed | survived (string only) | timeout | no tests | other | score |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        lines.append(
            f"| {p['module']} | {p['scope']} | {p['tests'] if p['tests'] is not None else '?'} | {p['mutants']} | "
            f"{p['killed']} | {p['survived']} ({p['survived_string_only']}) | {p['timeout']} | {p['no_tests']} | "
            f"{p['other']} | {_pct(p['score'])} |"
        )
    if len(points) > 1:
        lines.append(
            f"| **all** | | | {total['mutants']} | {total['killed']} | {total['survived']} "
            f"({total['survived_string_only']}) | {total['timeout']} | {total['no_tests']} | {total['other']} | "
            f"**{_pct(total['score'])}** |"
        )
    lines += [
        "",
        "Score: (killed + timeout) / mutants tested. Survived, no tests (no selected test calls the "
        "function) and other (suspicious, segfault) count against it. String only: the survivor changes "
        "nothing but a string literal (often a message, not always). How to read it: docs/mutation.md.",
    ]
    if total.get("not_checked"):
        lines += ["", f"**{total['not_checked']} mutants were not checked** (the run was interrupted)."]
    if data.get("slow_tests"):
        slow = ", ".join(f"{_code(name)} ({s:.1f} s)" for name, s in data["slow_tests"])
        lines += ["", f"Selected tests slower than {SLOW_TEST_S:g} s: {slow}."]
    if any(p["survivors"] for p in points):
        lines += ["", "## Surviving mutants", ""]
        lines += ["| mutant | where | was | became |", "| --- | --- | --- | --- |"]
        for p in points:
            for s in p["survivors"]:
                old, new = _change(s["diff"])
                mark = " (string)" if s["string_only"] else ""
                lines.append(
                    f"| {p['module']}: {_code(s['mutant'])}{mark} | {_where(p, s)} | {_code(old)} | {_code(new)} |"
                )
    unreached = [(p, s) for p in points for s in p["no_tests_mutants"]]
    if unreached:
        lines += [
            "",
            "## Mutants no selected test reaches",
            "",
            "| function | mutants | lines |",
            "| --- | --- | --- |",
        ]
        by_function: Dict[Tuple[str, str], List[Any]] = {}
        for p, s in unreached:
            by_function.setdefault((p["path"], s["function"]), []).append(s["line"])
        for (path, function), found in by_function.items():
            rows = sorted({line for line in found if line})
            lines.append(f"| {path}: {function} | {len(found)} | {', '.join(map(str, rows)) or '?'} |")
    return "\n".join(lines) + "\n"


def console(data: Dict[str, Any]) -> str:
    """The table and each survivor's diff, for the terminal."""
    header = ("module", "mutants", "killed", "survived", "timeout", "no tests", "other", "score")
    rows = [
        (
            p["module"],
            p["mutants"],
            p["killed"],
            f"{p['survived']} ({p['survived_string_only']} string)",
            p["timeout"],
            p["no_tests"],
            p["other"],
            _pct(p["score"]),
        )
        for p in data["points"]
    ]
    t = data["overall"]
    rows.append(
        ("all", t["mutants"], t["killed"], f"{t['survived']} ({t['survived_string_only']} string)", t["timeout"])
        + (t["no_tests"], t["other"], _pct(t["score"]))
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [header, *rows]]
    for p in data["points"]:
        for s in p["survivors"]:
            out += ["", f"survived: {_where(p, s)}  {s['mutant']}{'  (string only)' if s['string_only'] else ''}"]
            out += ["    " + line for line in s["diff"].splitlines()[2:]]
    return "\n".join(out)


# -------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", metavar="MODULE", help="only these (e.g. answers report.checks)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker (OMP_NUM_THREADS)")
    parser.add_argument("--reuse", action="store_true", help="keep mutants/ (mutmut's mutants and test stats)")
    parser.add_argument("--list", action="store_true", help="print the modules and what is mutated in each, and exit")
    parser.add_argument("--name", default="mutation", help="the results files' name")
    parser.add_argument("--append", action="store_true", help="merge into the results file's other modules")
    parser.add_argument("--fail-under", type=float, help="exit 1 when the overall score (0-100) is below this")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--render", metavar="JSON", help="re-render an earlier results file's tables and exit")
    args = parser.parse_args()
    if args.render:
        meta, points = read_results(args.render)
        print(markdown({**meta, "points": points}), end="")
        return 0
    config = mutmut_config()
    modules = select(modules_in_config(config), args.modules)
    if args.list:
        for m in modules:
            print(f"{m.name:24} {m.path:40} {m.scope}")
        return 0
    from importlib import metadata

    try:
        mutmut_version = metadata.version("mutmut")
    except metadata.PackageNotFoundError:
        raise SystemExit('mutmut is not installed: pip install -e ".[test,mutation]"') from None
    from firstsight.tracking.tracker import code_version

    os.chdir(ROOT)  # mutmut works in the checkout: pyproject.toml, mutants/
    patterns = [p for m in modules for p in m.patterns]
    print(f"mutmut {mutmut_version}, {args.workers} workers: {', '.join(m.name for m in modules)}", flush=True)
    code, seconds = run_mutmut(patterns, args.workers, args.threads, args.reuse)
    if code != 0:
        tail = (WORK / LOG).read_text(errors="replace")[-4000:]
        print(tail.replace("\r", "\n"), file=sys.stderr)
        print(f"mutmut run failed (exit {code}); its output: {WORK / LOG}", file=sys.stderr)
        return 1
    tests, slow = tests_by_module(modules)
    points = [module_point(m, tests.get(m.name)) for m in modules]
    data = run_meta(
        f"cpu_{os.cpu_count()}_cores",
        commit=code_version(),
        workers=args.workers,
        threads_per_worker=args.threads,
        modules=[m.name for m in modules],
        seconds=round(seconds, 1),
        slow_tests=slow,
        only_mutate=config["only_mutate"],
        scopes={path: list(functions) for path, functions in SCOPES.items()},
        tests=config.get("pytest_add_cli_args_test_selection", []),
    )
    data["versions"]["mutmut"] = mutmut_version
    path = results_path(args.results_dir, args.name, data["device"])
    points = merged(earlier_points(path, data, args.append), points, key=lambda p: p["module"])
    data["overall"] = overall(points)
    write_pair(path, {**data, "points": points}, markdown({**data, "points": points}))
    print(console({**data, "points": points}))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    score = data["overall"]["score"]
    if args.fail_under is not None and (score is None or 100 * score < args.fail_under):
        print(f"overall score {_pct(score)} is below {args.fail_under:g} %", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
