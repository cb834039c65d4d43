"""The documentation stays true to the repository: generated tables match the committed bench results,
links lead somewhere, and every file, make target and module the docs name exists."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import unicodedata
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files whose prose and comments name targets, modules and paths (the code's own docstrings are checked
# by the modules' owners).
NAMING = [*PAGES, ROOT / "Makefile", ROOT / "Dockerfile", ROOT / ".ci" / "run", ROOT / "gunicorn.conf.py",
          *sorted((ROOT / "deploy").rglob("*.py")), *sorted((ROOT / "deploy").rglob("*.yaml"))]  # fmt: skip
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def committed_results() -> list[Path]:
    """The bench results in git (not a JSON someone just produced and has not committed yet)."""
    try:
        out = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is on disk is what there is
        return sorted((ROOT / "bench" / "results").glob("*.json"))
    return [ROOT / line for line in out.splitlines() if line.endswith(".json")]


def test_performance_page_is_what_bench_report_renders_from_the_committed_results() -> None:
    page = (ROOT / "docs" / "performance.md").read_text()
    for bench in report.SECTIONS:
        assert f"<!-- bench:{bench}:start -->" in page, f"docs/performance.md has no section for bench {bench}"
    assert report.render_page(page, committed_results()) == page, (
        "docs/performance.md differs from the committed bench/results/*.json: run python -m bench.report"
    )


def test_every_generated_section_has_a_committed_result() -> None:
    files = committed_results()
    assert {b for b in report.SECTIONS if report.newest_result(b, files) is None} == set()


@pytest.mark.parametrize("bench", ["serve", "model", "cold_start", "transfer"])
def test_the_command_named_for_a_result_parses_back_to_its_recorded_arguments(bench: str) -> None:
    data = json.loads(report.newest_result(bench, committed_results()).read_text())
    argv = shlex.split(report.SECTIONS[bench].command(data))
    assert argv[:3] == ["python", "-m", f"bench.{bench}"]
    module = __import__(f"bench.{bench}", fromlist=["get_args_parser"])
    parsed = vars(module.get_args_parser().parse_args(argv[3:]))
    quick_sets = {"serve": report.SERVE_QUICK_SETS, "model": report.model_quick_sets(),
                  "cold_start": report.COLD_START_QUICK_SETS, "transfer": set()}[bench]  # fmt: skip
    for key, value in data["args"].items():
        if key == "json" or (data["args"].get("quick") and key in quick_sets):
            continue
        assert parsed[key] == value, f"{bench}: {key} parsed as {parsed[key]!r}, recorded {value!r}"


def test_the_soak_command_reproduces_its_recorded_settings() -> None:
    from bench.soak import get_args_parser

    data = json.loads(report.newest_result("soak", committed_results()).read_text())
    argv = shlex.split(report.soak_command(data))
    assert argv[:2] == ["python", "bench/soak.py"]
    args = get_args_parser().parse_args(argv[2:])
    assert not args.quick
    recorded = (data["requests"], data["concurrency"], data["workers"], data["threads"], data["hostile_share"])
    assert (args.requests, args.concurrency, args.workers, args.threads, args.hostile_share) == recorded
    assert min(args.rss_at, args.requests) == data["rss_mib"]["at_request"]


def test_rewrite_refuses_unpaired_or_unknown_markers() -> None:
    rendered = {"serve": "table"}
    page = "a\n<!-- bench:serve:start -->\nold\n<!-- bench:serve:end -->\nb\n"
    assert report.rewrite(page, rendered) == "a\n<!-- bench:serve:start -->\ntable\n<!-- bench:serve:end -->\nb\n"
    with pytest.raises(ValueError, match="exactly one"):
        report.rewrite(page + "<!-- bench:serve:end -->\n", rendered)
    with pytest.raises(ValueError, match="no bench named"):
        report.rewrite("<!-- bench:nope:start -->\n<!-- bench:nope:end -->\n", rendered)


# ---------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == []


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# ---------------------------------------------------------------- names of things


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


BENCH_OUTPUTS = ("bench/results/", "bench/.cache", "bench/peers/.venvs")


@pytest.mark.parametrize("path", NAMING, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_make_targets_modules_and_files_exist(path: Path) -> None:
    text = path.read_text()
    missing = []
    for target in re.findall(r"`make ([a-z][a-z-]*)", text) + re.findall(r"^\s*make ([a-z][a-z-]*)", text, re.M):
        if target not in make_targets():
            missing.append(f"make {target}")
    for module in re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text):
        as_path = ROOT / module.replace(".", "/")
        if module.split(".")[0] in {"model", "serving", "training", "bench", "deploy", "tests"}:
            if not (as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file()):
                missing.append(f"python -m {module}")
    for named in re.findall(r"(?<![\w/.-])((?:model|serving|training|bench|tests|deploy|docs|\.ci)/[\w./-]*\w)", text):
        # what benches write (results), make on first use (ignored: .cache, the peers' venvs)
        if not named.startswith(BENCH_OUTPUTS) and not (ROOT / named).exists():
            missing.append(named)
    assert missing == []
