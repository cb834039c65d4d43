"""Write the benchmark tables of docs/performance.md from the JSON results committed in bench/results/.

    python -m bench.report            # rewrite the generated sections of docs/performance.md
    python -m bench.report --check    # exit 1, changing nothing, when the page differs from the JSON

The benches write their results as bench/results/<bench>-<YYYYmmdd>-<HHMMSS>.json (bench.common's
write_results; bench/soak.py takes the same name through --out). For each bench that has a section in the
page, the newest file of that bench is rendered between ``<!-- bench:<bench>:start -->`` and
``<!-- bench:<bench>:end -->``: the command that produced it (rebuilt from what the JSON records), the
file, the date (from the file name), the machine and the load average (from the JSON), then its tables.
Everything outside the markers is written by hand and left alone. Tables are pasted by nobody: rerun a
bench, commit its JSON, run this, commit the page (tests/test_docs.py fails when they disagree).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "performance.md"
STAMPED = re.compile(r"^(?P<bench>[a-z_]+)-(?P<date>\d{8})-(?P<time>\d{6})\.json$")
MARKER = re.compile(r"<!-- bench:(?P<bench>[a-z_]+):(?P<edge>start|end) -->")

# ---------------------------------------------------------------- the command a result came from


def flags(recorded: dict[str, Any], defaults: dict[str, Any], skip: Collection[str] = ()) -> list[str]:
    """Command-line flags for the recorded arguments that differ from the parser's defaults.

    Every bench spells its options ``--<dest with dashes>``; ``json`` is left out (the file is named
    beside the command), and so is ``skip`` (what ``--quick`` sets by itself).
    """
    out: list[str] = []
    for dest, value in recorded.items():
        if dest in skip or dest == "json" or dest not in defaults or value == defaults[dest]:
            continue
        option = "--" + dest.replace("_", "-")
        if value is True:
            out.append(option)
        elif isinstance(value, list):
            for item in value:
                out += [option, str(item)]
        elif value not in (False, None):
            out += [option, str(value)]
    return out


def module_command(module: str, recorded: dict[str, Any], quick_sets: set[str]) -> str:
    """``python -m <module> ...`` for a bench whose JSON records its parsed arguments (``args``)."""
    parser = __import__(module, fromlist=["get_args_parser"]).get_args_parser()
    defaults = vars(parser.parse_args([]))
    skip = quick_sets if recorded.get("quick") else set()
    return shlex.join(["python", "-m", module, *flags(recorded, defaults, skip)])


def model_quick_sets() -> set[str]:
    """The arguments ``bench.model --quick`` overrides (its own quick_defaults, applied to the defaults)."""
    from bench.model import get_args_parser, quick_defaults

    args = get_args_parser().parse_args([])
    before = dict(vars(args))
    quick_defaults(args)
    return {k for k, v in vars(args).items() if before[k] != v}


# bench/serve.py (and bench/peers/run.py, with serve's quick_defaults) and bench/cold_start.py apply --quick
# inside main(): these are the arguments it overrides.
SERVE_QUICK_SETS = {"requests", "rounds", "limit_batches", "limit_seconds"}
COLD_START_QUICK_SETS = {"repeats"}


def serve_command(data: dict[str, Any]) -> str:
    return module_command("bench.serve", data["args"], SERVE_QUICK_SETS)


def peers_command(data: dict[str, Any]) -> str:
    return module_command("bench.peers.run", data["args"], SERVE_QUICK_SETS)


def model_command(data: dict[str, Any]) -> str:
    return module_command("bench.model", data["args"], model_quick_sets())


def cold_start_command(data: dict[str, Any]) -> str:
    return module_command("bench.cold_start", data["args"], COLD_START_QUICK_SETS)


def transfer_command(data: dict[str, Any]) -> str:
    return module_command("bench.transfer", data["args"], set())  # --quick sets no argument, only the runs


def soak_command(data: dict[str, Any]) -> str:
    """bench/soak.py records its settings as results, not as ``args``: the flags that reproduce them."""
    from bench.soak import get_args_parser

    recorded = {
        "requests": data["requests"],
        "concurrency": data["concurrency"],
        "workers": data["workers"],
        "threads": data["threads"],
        "hostile_share": data["hostile_share"],
        "rss_at": data["rss_mib"]["at_request"],
    }
    defaults = vars(get_args_parser().parse_args([]))
    return shlex.join(["python", "bench/soak.py", *flags(recorded, defaults)])


# ---------------------------------------------------------------- tables


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def clients(n: int) -> str:
    return f"{n} client" if n == 1 else f"{n} clients"


def machine(data: dict[str, Any]) -> str:
    cpu = data.get("cpu")
    if not cpu:
        return "not recorded"
    simd = "AVX-512" if cpu.get("avx512f") else "AVX2/FMA" if cpu.get("fma") else "no AVX2"
    return f"{cpu['model']} ({cpu['vendor']} family {cpu['family']}, {simd}), {cpu['cores']} cores"


def load_average(data: dict[str, Any]) -> str:
    """The 1-minute load average before and after the run, when the bench recorded it."""
    pair = data.get("loadavg_before_after")
    if not pair:
        return "not recorded"
    return f"{pair[0][0]:.1f} before, {pair[1][0]:.1f} after"


def shape(cfg: dict[str, Any]) -> str:
    """A server's processes and threads: workers × model threads, and a peer's batching."""
    if "workers" in cfg:
        return f"{cfg['workers']} × {cfg['threads_per_worker']}"
    settings = cfg.get("settings")
    if not isinstance(settings, dict):
        return str(settings or "-")
    text = f"{settings['workers']} × {settings['threads']}, batch {settings['batch']}"
    return text + (f" / {settings['batch_ms']} ms" if "batch_ms" in settings else "")


def workload_line(name: str, photos: list[dict[str, Any]]) -> str:
    sizes = [p["bytes"] / 1e3 for p in photos]
    turned = sum(1 for p in photos if p.get("orientation") not in (None, 1))
    return (f"{name}: {len(photos)} photos, {min(sizes):.0f}–{max(sizes):.0f} KB"
            + (f", {turned} stored turned with an EXIF orientation" if turned else ""))  # fmt: skip


def limit_lines(data: dict[str, Any]) -> list[str]:
    """The machine's limit per workload (bench/limit.py), as measured in the run."""
    lim = data["limit"]
    runs = lim["measurements"]
    rows = [[w, e["pipeline"], f"{e['decode_img_s']:.1f} ({runs[0]['workloads'][w]['project']['decode']['processes']})",
             f"{lim['model_img_s']:.1f}", f"{e['limit_img_s']:.1f}"] for w, e in lim["workloads"].items()]  # fmt: skip
    best = ", ".join(f"{m['model'].get('layout', 'one process on all cores')} at batch {m['model']['best_batch']}"
                     for m in runs)  # fmt: skip
    layouts = "; ".join(
        ", ".join(f"{o['layout']} {o['img_s']:.1f} img/s" for o in m["model"]["layouts"])
        for m in runs if m["model"].get("layouts")
    )  # fmt: skip
    return [
        f"The machine's limit (`bench/limit.py`; median of {len(runs)} measurement(s) in this run): model alone "
        f"with ONNX Runtime on all cores, {lim['model_input']} input, best layout and batch: {best}"
        + (f" (layouts measured: {layouts})" if layouts else "")
        + "; 1 / (1/decode + 1/model).",
        "",
        *table(
            [
                "photos",
                "decode + prepare",
                "decode + prepare, photos/s (processes)",
                "model alone, img/s",
                "limit, photos/s",
            ],
            rows,
        ),  # fmt: skip
    ]


def summary_lines(data: dict[str, Any], levels: list[int]) -> list[str]:
    """Per workload and server: p50 at the fewest clients, req/s at the most, ÷ the limit (and ÷ naive)."""
    top, low = max(levels), min(levels)
    naive = any("naive" in per for per in data["ratios"].values())
    rows = []
    for w, per in data["ratios"].items():
        for name, r in per.items():
            row = [w, name, shape(data["servers"][name]), ms(r[f"p50_c{low}_ms"]), f"{r[f'req_s_c{top}']:.1f}",
                   f"{r[f'over_limit_c{top}']:.2f}"]  # fmt: skip
            if naive:
                ratio = r.get(f"over_naive_c{top}")
                row.append("-" if ratio is None else f"{ratio:.2f}")
            rows.append(row)
    header = ["photos", "server", "workers × model threads", f"p50 at {clients(low)}, ms",
              f"req/s at {clients(top)}", "÷ limit"] + (["÷ naive"] if naive else [])  # fmt: skip
    return table(header, rows)


def memory_lines(data: dict[str, Any]) -> list[str]:
    rows = [[name, m["idle"]["processes"], f"{m['idle']['pss_mib']:.0f}", f"{m['after_load']['pss_mib']:.0f}"]
            for name, m in data["memory_mib"].items()]  # fmt: skip
    return table(["server", "processes", "PSS idle after warm-up, MiB", "PSS after the load, MiB"], rows)


def load_lines(data: dict[str, Any], levels: list[int]) -> list[str]:
    lines: list[str] = []
    for w, entry in data["workloads"].items():
        rows = []
        for name, per in entry["load"].items():
            for c in levels:
                r = per[str(c)]
                rows.append([name, c, f"{r['req_s']:.1f}", ms(r["p50_ms"]), ms(r["p95_ms"]), ms(r["p99_ms"]),
                             r["errors"]])  # fmt: skip
        lines += ["", workload_line(w, entry["photos"]), ""]
        lines += table(["server", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"], rows)
    return lines


def run_levels(data: dict[str, Any]) -> list[int]:
    return sorted({int(c) for w in data["workloads"].values() for per in w["load"].values() for c in per})


def render_serve(data: dict[str, Any]) -> list[str]:
    levels = run_levels(data)
    lines = [*summary_lines(data, levels), "", *memory_lines(data), "", *limit_lines(data)]
    return lines + load_lines(data, levels)


def render_peers(data: dict[str, Any]) -> list[str]:
    levels = run_levels(data)
    top, low = max(levels), min(levels)
    rows = []
    for name, cfg in data["servers"].items():
        versions = ", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items()) or "this environment"
        rows.append([name, cfg["kind"], shape(cfg), versions, f"{cfg.get('ready_s', 0):.1f}",
                     cfg.get("top1_same_as_service", "-")])  # fmt: skip
    lines = table(["server", "kind", "workers × model threads, batching", "versions", "ready after, s",
                   "top-1 same as the service's"], rows)  # fmt: skip
    lines += ["", *summary_lines(data, levels), "", *memory_lines(data)]
    versus = [[w, v["best_peer"], f"{v['req_s_ratio']:.2f}", "-" if v["p50_ratio"] is None else f"{v['p50_ratio']:.2f}",
               f"{v['pss_ratio']:.2f}"] for w, v in data["versus_best_peer"].items() if v]  # fmt: skip
    if versus:
        lines += ["", *table(["photos", "best peer (req/s)", f"service ÷ best peer, req/s at {clients(top)}",
                              f"p50 at {clients(low)}", "PSS after the load"], versus)]  # fmt: skip
    return [*lines, "", *limit_lines(data), *load_lines(data, levels)]


def render_model(data: dict[str, Any]) -> list[str]:
    batches = sorted({r["batch"] for r in data["grid"]["rows"]})
    cols = [f"b{b}" for b in batches]
    rows = []
    for name, run in data["malloc_comparison"].items():
        for model, backend in dict.fromkeys((r["model"], r["backend"]) for r in run["rows"]):
            cells = {r["batch"]: r for r in run["rows"] if (r["model"], r["backend"]) == (model, backend)}
            rows.append([model, backend, name, *(f"{cells[b]['img_s']:.1f}" for b in batches),
                         run["allocator"]["48MiB_block_mmapped"]])  # fmt: skip
    lines = ["Allocators, all threads: images/s by batch.", ""]
    lines += table(["model", "backend", "allocator", *cols, "48 MiB block mmapped"], rows)
    grid = data["grid"]["rows"]
    rows = []
    for key in dict.fromkeys((r["model"], r["backend"], r["threads"]) for r in grid):
        cells = {r["batch"]: r for r in grid if (r["model"], r["backend"], r["threads"]) == key}
        best = max(c["pct_peak"] for c in cells.values())
        rows.append([*key, *(f"{cells[b]['img_s']:.1f} ({cells[b]['latency_ms']:.0f})" for b in batches),
                     f"{best:.1f}"])  # fmt: skip
    lines += ["", f"Under the allocator that won ({data['best_malloc']}): images/s (median latency ms).", ""]
    lines += table(["model", "backend", "threads", *cols, "% of FP32 peak (best batch)"], rows)
    peak = data["fp32_peak"]
    gemm = ", ".join(f"{f / 1e9:.0f} GFLOP/s on {t} thread(s)" for t, f in data["sgemm_flops_measured"].items())
    flops = ", ".join(f"{m['name']} {m['flops_per_image'] / 1e9:.2f} GFLOP" for m in data["models"])
    lines += [
        "",
        f"FP32 peak {peak['flops'] / 1e9:.0f} GFLOP/s = {peak['how']}; a 1024×1024 matmul reached {gemm}. "
        f"Per image: {flops}. torch {data['torch']}.",
    ]
    return lines


def render_cold_start(data: dict[str, Any]) -> list[str]:
    rows = [[b, len(data["runs"][b]), f"{m['total_s']:.2f}", f"{m['imports_s']:.2f}", f"{m['model_load_warmup_s']:.2f}",
             f"{m['after_imports_s']:.2f}"] for b, m in data["median"].items()]  # fmt: skip
    header = ["backend", "starts", "to /readyz 200, s", "imports, s", "model load + warm-up, s", "after imports, s"]
    return ["Medians of the starts.", "", *table(header, rows)]


def render_soak(data: dict[str, Any]) -> list[str]:
    lat, rss = data["latency_ms"], data["rss_mib"]
    every = rss["every_1000_requests"]
    rows = [
        ["requests (half hostile) / concurrent clients", f"{data['requests']} / {data['concurrency']}"],
        ["workers × request threads", f"{data['workers']} × {data['threads']}"],
        ["unexpected statuses (target 0)", data["unexpected"]],
        ["worker PIDs unchanged", data["worker_pids_unchanged"]],
        ["tracebacks in the log", data["tracebacks_in_log"]],
        ["wall time, throughput", f"{data['wall_s']} s, {data['throughput_rps']} req/s"],
        ["latency p50 / p99 / max, all", f"{lat['all']['p50']} / {lat['all']['p99']} / {lat['all']['max']} ms"],
        ["latency p50 / p99 / max, valid photos",
         f"{lat['valid']['p50']} / {lat['valid']['p99']} / {lat['valid']['max']} ms"],
        [f"worker RSS after request {rss['at_request']} → end", f"{rss['at']} → {rss['end']} MiB"],
        ["RSS growth (target ≤ 10 %)", f"{rss['growth_pct']} %"],
    ]  # fmt: skip
    if every:
        rows.append(["RSS every 1,000 requests", ", ".join(f"{v:.0f}" for v in every.values()) + " MiB"])
    return table(["", ""], rows)


def render_transfer(data: dict[str, Any]) -> list[str]:
    rows = [[r["images_per_class"], r["recipe"], r["arch"], r["img_size"], r["train_images"],
             r["epochs"] if r["unfreeze_at"] is None else f"{r['epochs']} (all from {r['unfreeze_at']})",
             f"{r['test_top1'] * 100:.2f} %", f"{r['best_val_top1'] * 100:.2f} %", f"{r['wall_seconds'] / 60:.1f}"]
            for r in data["rows"]]  # fmt: skip
    first = data["rows"][0]
    lines = [
        f"Seed {first['seed']}; every run validates on the same {first['val_images']} images and is scored on the "
        f"same {first['test_images']} test images ({data['test_sample']} of Fashion-MNIST's test split); wall "
        "time: training, validation and the test evaluation.",
        "",
    ]
    header = ["images/class", "recipe", "network", "px", "training images", "epochs", "test top-1", "best val top-1",
              "wall, min"]  # fmt: skip
    lines += table(header, rows)
    done = {(r["images_per_class"], r["recipe"]) for r in data["rows"]}
    missing = [f"{recipe} at {size}" for size in map(int, data["args"]["sizes"].split(","))
               for recipe in data["args"]["recipes"].split(",") if (size, recipe) not in done]  # fmt: skip
    return lines + (["", f"Not measured (the run was stopped before): {', '.join(missing)}."] if missing else [])


@dataclass(frozen=True)
class Section:
    render: Callable[[dict[str, Any]], list[str]]
    command: Callable[[dict[str, Any]], str]


SECTIONS = {
    "serve": Section(render_serve, serve_command),
    "peers": Section(render_peers, peers_command),
    "model": Section(render_model, model_command),
    "cold_start": Section(render_cold_start, cold_start_command),
    "soak": Section(render_soak, soak_command),
    "transfer": Section(render_transfer, transfer_command),
}

# ---------------------------------------------------------------- files and the page


def newest_result(bench: str, files: Iterable[Path]) -> Path | None:
    """The newest ``<bench>-<date>-<time>.json`` among ``files`` (the stamp in the name orders them)."""
    found = [p for p in files if (m := STAMPED.match(p.name)) and m["bench"] == bench]
    return max(found, key=lambda p: p.name, default=None)


def recorded_at(path: Path) -> str:
    m = STAMPED.match(path.name)
    d, t = m["date"], m["time"]
    return f"{d[:4]}-{d[4:6]}-{d[6:]} {t[:2]}:{t[2:4]}"


def render_section(bench: str, files: Iterable[Path]) -> str:
    """The Markdown of one generated section (without its markers), from the newest of ``files`` for ``bench``."""
    section = SECTIONS[bench]
    path = newest_result(bench, files)
    if path is None:
        return "No result of this bench is committed: run it, commit its JSON, then `python -m bench.report`."
    data = json.loads(path.read_text())
    head = (
        f"`{section.command(data)}` → `{path.relative_to(REPO) if path.is_relative_to(REPO) else path}`, "
        f"recorded {recorded_at(path)}; machine: {machine(data)}; load average: {load_average(data)}."
    )
    return "\n".join([head, "", *section.render(data)])


def rewrite(page: str, rendered: dict[str, str]) -> str:
    """``page`` with the text between each bench's markers replaced; every marker must come in one pair."""
    found = [(m["bench"], m["edge"]) for m in MARKER.finditer(page)]
    for bench in {b for b, _ in found}:
        if found.count((bench, "start")) != 1 or found.count((bench, "end")) != 1:
            raise ValueError(f"docs/performance.md: bench:{bench} needs exactly one start and one end marker")
        if bench not in rendered:
            raise ValueError(f"docs/performance.md: no bench named {bench!r} (known: {', '.join(SECTIONS)})")

    def replace(m: re.Match[str]) -> str:
        return f"<!-- bench:{m['bench']}:start -->\n{rendered[m['bench']]}\n<!-- bench:{m['bench']}:end -->"

    return re.sub(r"<!-- bench:(?P<bench>[a-z_]+):start -->.*?<!-- bench:(?P=bench):end -->", replace, page,
                  flags=re.S)  # fmt: skip


def render_page(page: str, files: Iterable[Path]) -> str:
    """``page`` with every generated section rendered from ``files`` (JSON results)."""
    files = list(files)
    return rewrite(page, {bench: render_section(bench, files) for bench in SECTIONS})


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write docs/performance.md's benchmark tables from bench/results/*.json.")
    p.add_argument("--check", action="store_true", help="only report whether the page is up to date (default: off)")
    p.add_argument("--page", default=str(PAGE), help="the page to rewrite (default: %(default)s)")
    p.add_argument("--results", default=str(RESULTS_DIR), help="the JSON results (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> int:
    page = Path(args.page)
    current = page.read_text()
    new = render_page(current, sorted(Path(args.results).glob("*.json")))
    if args.check:
        if new != current:
            print(f"{page} is out of date with {args.results}: run python -m bench.report")
            return 1
        print(f"{page} is up to date")
        return 0
    if new != current:
        page.write_text(new)
        print(f"rewrote {page}")
    else:
        print(f"{page} was up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
