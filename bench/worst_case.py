"""Worst-case inputs: what one request can cost the serving worker, in CPU time and peak memory.

    python -m bench.worst_case [--quick] [--only NAME,NAME] [--out PATH]

Each input is generated here, in memory and deterministically (no downloads): the hostile corpus's
largest and deepest cases (tests/support/hostile.py), TIFFs of thousands of 1x1 pages, GIFs of many frames, a
40 MP 16-bit greyscale PNG of ~80 KB, 16-bit and float TIFFs, a 40 MP RGBA PNG (the default
FLASK_MAX_IMAGE_PIXELS), progressive JPEGs of very many scans, sixteen 40 MP PNGs in one request,
a 12 MP phone-like JPEG as the ordinary reference and a small photo (chelsea.png) as the baseline.

For each input a fresh gunicorn serves the default model as `make run` does (its ONNX export made
ahead of time), answers one small warm-up request, and then gets the input as POST /predict. The
worker's CPU time (utime + stime from /proc/<pid>/stat) and its peak RSS (VmHWM from /proc/<pid>/status)
are read just before and after that request: a fresh worker per input keeps the high-water mark clean.
Every request has a client timeout (``--timeout``); a request still running then is reported as
"timeout" with the CPU it had used so far. Inputs whose cost grows with their size (TIFF pages, JPEG
scans) are measured at a few sizes, capped (``--max-pages``, ``--max-scans``) so the run ends; the
body limit (10 MB) allows far more, and the table's scaling lines say what the largest would cost.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from bench.common import cpu_info, write_results
from bench.serve import prepare_model_dir
from serving.launcher import GunicornServer
from tests.support import hostile  # the hostile-input corpus

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY_LIMIT = 10 * 1024 * 1024  # the service's default MAX_CONTENT_LENGTH
# The hostile corpus's largest bodies (the body limit, a 80 MP PNG, 17 files), its pixel bombs, its
# extreme shapes and its multi-frame containers.
HOSTILE_PICKS = (
    "body_over_limit_declared",
    "body_over_limit_chunked",
    "png_80mp_under_byte_limit",
    "too_many_files",
    "png_bomb",
    "gif_bomb",
    "jpeg_bomb",
    "one_by_10000",
    "10000_by_one",
    "multipage_tiff_first_page",
    "animated_gif_first_frame",
    "animated_webp_first_frame",
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure the worker's CPU time and peak memory for worst-case inputs.")
    p.add_argument("--quick", action="store_true", help="a few inputs at small sizes, a few minutes (default: off)")
    p.add_argument("--only", default="", help="comma-separated input names to run (default: all); --list shows them")
    p.add_argument("--list", action="store_true", help="print the input names and exit")
    p.add_argument("--bundle", default="models/default.pth", help="model to serve (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, s (default: %(default)s)")
    p.add_argument(
        "--max-pages", type=int, default=40_000, help="most pages of the many-page TIFFs (default: %(default)s)"
    )
    p.add_argument(
        "--max-scans", type=int, default=3_000, help="most scans of the progressive JPEGs (default: %(default)s)"
    )
    p.add_argument("--out", "--json", dest="out", default=None, help="results file (default: bench/results/...)")
    return p


# ---------------------------------------------------------------- inputs


def _bytes(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def photo_paths() -> dict[str, Path]:
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    skl = Path(sklearn.__file__).parent / "datasets" / "images"
    return {"chelsea": sk / "chelsea.png", "coffee": sk / "coffee.png", "china": skl / "china.jpg"}


_TIFF_TAGS = (  # (tag, type 3 = SHORT / 4 = LONG, value): a 1x1 8-bit grey page whose one strip is at offset 8
    (256, 3, 1),
    (257, 3, 1),
    (258, 3, 8),
    (259, 3, 1),
    (262, 3, 1),
    (273, 4, 8),
    (278, 3, 1),
    (279, 4, 1),
)


def tiff_pages(n: int) -> bytes:
    """A little-endian TIFF of ``n`` 1x1 pages (102 bytes each) sharing one pixel: ~10,000 pages a MB.

    Written by hand: Pillow's own writer takes quadratic time for thousands of pages."""
    ifd_size = 2 + 12 * len(_TIFF_TAGS) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 10) + b"\x80\x00")
    entries = b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in _TIFF_TAGS
    )
    for i in range(n):
        following = 10 + (i + 1) * ifd_size if i + 1 < n else 0
        out += struct.pack("<H", len(_TIFF_TAGS)) + entries + struct.pack("<I", following)
    return bytes(out)


# a 1x1 frame at (0, 0) without a local palette: LZW minimum code size 2, codes clear, 0, end (15 bytes)
_GIF_FRAME = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02" + b"\x02\x44\x01\x00"


def gif_frames(n: int) -> bytes:
    """A 64x64 GIF followed by ``n - 1`` 1x1 frames: ~70,000 frames a MB."""
    first = _bytes(Image.new("P", (64, 64), 1), "GIF")
    return first[:-1] + _GIF_FRAME * (n - 1) + b";"


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment after SOI; a scan's entropy-coded data belongs to its SOS."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        j = i + 2 + struct.unpack_from(">H", data, i + 2)[0]
        if marker == 0xDA:
            while not (data[j] == 0xFF and data[j + 1] != 0x00 and not 0xD0 <= data[j + 1] <= 0xD7):
                j += 1
        out.append((marker, i, j))
        i = j
    return out


def progressive_jpeg_scans(extra_scans: int, size: tuple[int, int] = (8000, 5000)) -> bytes:
    """A 40 MP greyscale progressive JPEG with ``extra_scans`` copies of one AC scan (~65 bytes each).

    libjpeg accepts a repeated scan (a warning at most) and walks every block of the image for each,
    so the cost is scans x blocks, while each copy is a few end-of-band runs on the wire."""
    base = _bytes(Image.new("L", size, 128), "JPEG", progressive=True, quality=90)
    scans = [(s, e) for marker, s, e in _jpeg_segments(base) if marker == 0xDA]
    start, end = scans[1]  # the first AC scan (spectral selection 1..5)
    return base[:end] + base[start:end] * extra_scans + base[end:]


def phone_jpeg(photo: Path) -> bytes:
    """12 MP (4000x3000) JPEG at quality 92 with sensor-like noise: ~3 MB, like a phone's photo."""
    rng = np.random.default_rng(0)
    img = Image.open(photo).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (3000, 4000, 3)).astype(np.float32)
    return _bytes(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG", quality=92)


def upload(name: str, data: bytes) -> dict[str, Any]:
    return {"files": {"file": (name, data, "application/octet-stream")}}


@dataclass
class Input:
    name: str
    what: str
    make: Callable[[], dict[str, Any]]  # requests kwargs, built only when the input runs
    method: str = "POST"
    path: str = "/predict"
    concurrent: int = 1  # the same request sent this many times at once
    group: str = ""  # inputs of one family measured at several sizes
    size: int = 0
    quick: bool = False  # part of --quick
    extra: dict[str, Any] = field(default_factory=dict)


def build_inputs(args: argparse.Namespace) -> list[Input]:
    photos = photo_paths()
    mp40 = (8000, 5000)  # exactly the default FLASK_MAX_IMAGE_PIXELS: accepted
    inputs = [
        Input(
            "baseline_chelsea",
            "chelsea.png, 451x300 RGB",
            lambda: upload("chelsea.png", photos["chelsea"].read_bytes()),
            quick=True,
        ),
        Input(
            "phone_12mp_jpeg",
            "4000x3000 JPEG q92 (ordinary reference)",
            lambda: upload("phone.jpg", phone_jpeg(photos["chelsea"])),
            quick=True,
        ),
        Input(
            "png16_40mp",
            "8000x5000 16-bit grey PNG",
            lambda: upload("g16.png", _bytes(Image.new("I;16", mp40, 40000), "PNG", compress_level=9)),
            quick=True,
        ),
        Input(
            "tiff16_40mp",
            "8000x5000 16-bit grey TIFF, deflate",
            lambda: upload("g16.tif", _bytes(Image.new("I;16", mp40, 40000), "TIFF", compression="tiff_adobe_deflate")),
        ),
        Input(
            "tiff_float_40mp",
            "8000x5000 32-bit float TIFF, deflate",
            lambda: upload("f.tif", _bytes(Image.new("F", mp40, 0.5), "TIFF", compression="tiff_adobe_deflate")),
        ),
        Input(
            "rgba_png_40mp",
            "8000x5000 RGBA PNG",
            lambda: upload("rgba.png", _bytes(Image.new("RGBA", mp40, (10, 200, 30, 128)), "PNG", compress_level=9)),
        ),
        Input(
            "png16_40mp_x16_files",
            "16 files of 8000x5000 16-bit grey PNG in one request (FLASK_MAX_FILES)",
            lambda: {"files": [("file", (f"{i}.png", _png16_40mp(), "image/png")) for i in range(16)]},
        ),
        Input(
            "png16_40mp_4_concurrent",
            "4 concurrent requests of the 16-bit 40 MP PNG (peak of all four)",
            lambda: upload("g16.png", _png16_40mp()),
            concurrent=4,
        ),
    ]
    pages = sorted({p for p in (2_500, 10_000, 40_000) if p <= args.max_pages} | {min(args.max_pages, 40_000)})
    for n in pages:
        inputs.append(
            Input(
                f"tiff_{n}_pages",
                f"TIFF of {n:,} 1x1 pages",
                lambda n=n: upload("pages.tif", tiff_pages(n)),
                group="tiff_pages",
                size=n,
                quick=n == pages[0],
            )  # fmt: skip
        )
    for n in (70_000, 690_000):  # ~1 MB and the most under the 10 MB body limit
        inputs.append(
            Input(
                f"gif_{n}_frames",
                f"64x64 GIF + {n - 1:,} 1x1 frames",
                lambda n=n: upload("frames.gif", gif_frames(n)),
                group="gif_frames",
                size=n,
                quick=n == 70_000,
            )  # fmt: skip
        )
    scans = sorted({s for s in (300, 1_000, 3_000) if s <= args.max_scans} | {min(args.max_scans, 3_000)})
    for n in scans:
        inputs.append(
            Input(
                f"jpeg_{n}_scans",
                f"8000x5000 progressive grey JPEG + {n:,} repeated AC scans",
                lambda n=n: upload("scans.jpg", progressive_jpeg_scans(n)),
                group="jpeg_scans",
                size=n,
                quick=n == scans[0],
            )  # fmt: skip
        )
    corpus = {c.name: c for c in hostile.build_cases(photos)}
    for name in HOSTILE_PICKS:
        case = corpus[name]
        inputs.append(
            Input(
                f"hostile_{name}",
                f"tests/hostile.py: expects {case.status} {case.code or ''}".strip(),
                case.request_kwargs,
                method=case.method,
                path=case.path,
                quick=name in ("png_80mp_under_byte_limit", "multipage_tiff_first_page"),
            )  # fmt: skip
        )
    return inputs


_PNG16: dict[str, bytes] = {}


def _png16_40mp() -> bytes:
    if "b" not in _PNG16:
        _PNG16["b"] = _bytes(Image.new("I;16", (8000, 5000), 40000), "PNG", compress_level=9)
    return _PNG16["b"]


# ---------------------------------------------------------------- /proc


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker_pid(server: GunicornServer) -> int:
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one gunicorn worker, found {children}")
    return int(children[0])


# ---------------------------------------------------------------- measuring


class CountingBody:
    """Wraps a streamed body (a generator) to count the bytes actually sent."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.sent = chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk


def send(method: str, url: str, kwargs: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request: status, error code ("ok" for predictions), wall seconds and bytes sent."""
    kwargs, stream = dict(kwargs), None
    if kwargs.get("data") is not None and not isinstance(kwargs["data"], (bytes, str, dict, list)):
        stream = kwargs["data"] = CountingBody(iter(kwargs["data"]))
    req = requests.Request(method, url, **kwargs).prepare()
    body = req.body
    wire = len(body) if isinstance(body, (bytes, str)) else None
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        with requests.Session() as s:
            r = s.send(req, timeout=(10, timeout))
        out["status"] = r.status_code
        try:
            payload = r.json()
            out["code"] = (payload.get("error") or {}).get("code") or (
                "ok" if "predictions" in payload or "results" in payload else None
            )
        except ValueError:
            out["code"] = "not JSON"
    except requests.Timeout:
        out["status"], out["code"] = "timeout", None
    except requests.ConnectionError as exc:
        out["status"], out["code"] = "connection error", type(exc.__cause__ or exc).__name__
    out["wall_s"] = time.perf_counter() - t0
    out["bytes"] = wire if wire is not None else (stream.sent if stream else 0)
    return out


def measure(spec: Input, model_dir: Path, workdir: Path, warmup: dict[str, Any], timeout: float) -> dict[str, Any]:
    kwargs = spec.make()
    server = GunicornServer(model_dir, workdir / f"{spec.name}.log", name=spec.name)
    row: dict[str, Any] = {"input": spec.name, "what": spec.what, "concurrent": spec.concurrent}
    if spec.group:
        row["group"], row["size"] = spec.group, spec.size
    server.start()
    pid = None
    try:
        pid = worker_pid(server)
        assert server.proc is not None
        row["worker_rss_ready_mib"] = proc_status_kib(pid, "VmRSS") / 1024
        row["master_rss_mib"] = proc_status_kib(server.proc.pid, "VmRSS") / 1024
        warm = send("POST", server.url("/predict"), warmup, 30)
        if warm["status"] != 200:
            raise RuntimeError(f"warm-up request failed: {warm}")
        cpu0, hwm0, rss0 = proc_cpu_s(pid), proc_status_kib(pid, "VmHWM"), proc_status_kib(pid, "VmRSS")
        load0 = os.getloadavg()[0]
        results: list[dict[str, Any]] = [{} for _ in range(spec.concurrent)]

        def one(i: int) -> None:
            results[i] = send(spec.method, server.url(spec.path), kwargs, timeout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(spec.concurrent)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        alive = Path(f"/proc/{pid}").exists() and pid == worker_pid(server)
        row.update(
            {
                "bytes": results[0]["bytes"],
                "status": results[0]["status"],
                "code": results[0]["code"],
                "statuses": [r["status"] for r in results] if spec.concurrent > 1 else None,
                "wall_s": wall,
                "worker_alive": alive,
                "loadavg_1m_before": load0,
            }
        )
        if alive:
            row["cpu_s"] = proc_cpu_s(pid) - cpu0
            row["peak_rss_added_mib"] = (proc_status_kib(pid, "VmHWM") - hwm0) / 1024
            row["peak_rss_mib"] = proc_status_kib(pid, "VmHWM") / 1024
            row["rss_before_mib"] = rss0 / 1024
            row["rss_after_mib"] = proc_status_kib(pid, "VmRSS") / 1024
        if row["status"] == "timeout":
            row["note"] = f"still running after the {timeout:.0f} s client timeout: CPU and memory are lower bounds"
    finally:
        server.stop(timeout=10)
        if pid is not None and Path(f"/proc/{pid}").exists():  # a worker stuck in a request outlives its master
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    return row


# ---------------------------------------------------------------- report


def scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per family: CPU per size, the exponent between the two largest, and the CPU extrapolated to the body limit."""
    out: dict[str, Any] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("group") and r.get("cpu_s"):
            groups.setdefault(r["group"], []).append(r)
    for name, rs in groups.items():
        rs.sort(key=lambda r: r["size"])
        entry: dict[str, Any] = {
            "sizes": [r["size"] for r in rs],
            "cpu_s": [r["cpu_s"] for r in rs],
            "bytes": [r["bytes"] for r in rs],
        }
        if len(rs) >= 2 and rs[-2]["cpu_s"] > 0:
            a, b = rs[-2], rs[-1]
            k = np.log(b["cpu_s"] / a["cpu_s"]) / np.log(b["size"] / a["size"])
            per_unit = (b["bytes"] - a["bytes"]) / (b["size"] - a["size"])  # bytes of one more page/scan/frame
            at_limit = b["size"] + (BODY_LIMIT - b["bytes"]) / per_unit  # the most that fits the body limit
            entry["exponent"] = float(k)
            entry["size_at_body_limit"] = int(at_limit)
            entry["cpu_s_at_body_limit_extrapolated"] = float(b["cpu_s"] * (at_limit / b["size"]) ** max(k, 1.0))
        out[name] = entry
    return out


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def print_table(result: dict[str, Any]) -> None:
    print(f"\nload average before/after: {result['loadavg_before']} / {result['loadavg_after']}")
    print("\n| input | bytes on the wire | status | code | wall s | CPU s | +peak RSS MiB | peak RSS MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['input']} | - | bench error: {r['error']} | | | | | |")
            continue
        status = r["status"] if r["concurrent"] == 1 else ",".join(map(str, r["statuses"]))
        if not r["worker_alive"]:
            status = f"{status} (worker died)"
        print(
            f"| {r['input']} | {r['bytes']:,} | {status} | {r['code'] or ''} | {fmt(r['wall_s'], '.2f')} | "
            f"{fmt(r.get('cpu_s'), '.2f')} | {fmt(r.get('peak_rss_added_mib'), '.0f')} | "
            f"{fmt(r.get('peak_rss_mib'), '.0f')} |"
        )
    for name, s in result["scaling"].items():
        line = ", ".join(f"{n:,}: {c:.2f} s" for n, c in zip(s["sizes"], s["cpu_s"], strict=True))
        extra = ""
        if "exponent" in s:
            extra = (f"; CPU ~ size^{s['exponent']:.2f}; at the 10 MB body limit (~{s['size_at_body_limit']:,}) "
                     f"~{s['cpu_s_at_body_limit_extrapolated']:.0f} s CPU (extrapolated, at least linear)")  # fmt: skip
        print(f"scaling {name}: CPU {line}{extra}")


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.max_pages, args.max_scans = min(args.max_pages, 2_500), min(args.max_scans, 300)
    inputs = build_inputs(args)
    if args.list:
        for i in inputs:
            print(f"{i.name:<40} {i.what}")
        return {}
    if args.only:
        wanted = [n for n in args.only.split(",") if n]
        unknown = set(wanted) - {i.name for i in inputs}
        if unknown:
            raise SystemExit(f"unknown inputs: {', '.join(sorted(unknown))} (see --list)")
        inputs = [i for i in inputs if i.name in wanted]
    elif args.quick:
        inputs = [i for i in inputs if i.quick]
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise SystemExit(f"{bundle} is missing: python -m model.default --out {bundle}")
    result: dict[str, Any] = {"cpu": cpu_info(), "args": vars(args), "loadavg_before": os.getloadavg(), "rows": []}
    result["caps"] = (
        f"TIFF pages capped at {args.max_pages:,} and JPEG scans at {args.max_scans:,} so the run ends; the 10 MB "
        "body limit allows ~100,000 pages or ~150,000 scans (see 'scaling')"
    )
    warmup = upload("chelsea.png", photo_paths()["chelsea"].read_bytes())
    with tempfile.TemporaryDirectory(prefix="bench-worst-") as tmp:
        workdir = Path(tmp)
        prepare_model_dir(bundle, "onnx", workdir / "models")
        for spec in inputs:
            print(f"... {spec.name}", flush=True)
            try:
                row = measure(spec, workdir / "models", workdir, warmup, args.timeout)
            except (RuntimeError, OSError) as exc:
                row = {"input": spec.name, "what": spec.what, "error": str(exc)[:2000]}
            result["rows"].append(row)
            print("    " + json.dumps({k: v for k, v in row.items() if k not in ("what",)}), flush=True)
    result["loadavg_after"] = os.getloadavg()
    result["scaling"] = scaling(result["rows"])
    print_table(result)
    path = write_results("worst_case", result, args.out)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
