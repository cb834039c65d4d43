"""Smoke test of a running container (what CI runs through ../shared/tools/docker-check).

Asks the service on 127.0.0.1:$PORT for /healthz and /readyz, classifies scikit-image's chelsea.png
(a photo of a cat, taken from the installed scikit-image) through POST /predict, checks /metrics, and,
when the repository has a static/ folder, that its files (the compiled CSS) are served from the image.

With ``--container NAME`` it also checks, through the docker CLI, what only the real image can show
(hadolint, run by docker-check and tests/test_deploy.py, lints the Dockerfile's text):
- the image's settings: a numeric non-root USER, one exposed port that is the port of the default bind
  in GUNICORN_CMD_ARGS, exec-form CMD of gunicorn (so it is PID 1 and gets SIGTERM) and no ENTRYPOINT,
  an exec-form Python HEALTHCHECK, PATH starting at the venv, PYTHONUNBUFFERED, only real FLASK_*
  settings; and that deploy/k8s agrees (runAsUser, containerPort, the ConfigMap's FLASK_MODEL_DIR);
- inside the running container: every process runs as that uid, PID 1 is gunicorn, Python is the
  copied venv, the root file system is mounted read-only while /tmp takes writes (--read-only), the default
  model and its ONNX export are baked where FLASK_MODEL_DIR points, torch and torchvision are the
  versions requirements-serve.txt pins (and the CPU-only build, --cpu-torch, for an image built with
  the default TORCH_INDEX_URL), no compiler and no apt package lists, and /app holds the
  service's files and none of tests/, training/, bench/...;
- the healthcheck script answers 0 when run in the container, and Docker's own verdict turns healthy;
- the image's org.opencontainers.image.* labels carry the repository's version (model/version.py), the
  revision given with ``--revision`` and the licence, as GET /version does.

With ``--stress`` it then sends what the production envelope must survive: a worst-case input (a 40 MP
16-bit greyscale PNG, ~80 KB on the wire) and a burst of concurrent predictions and explanations (these load
torch into every worker: the envelope must hold that too); every answer must be a
200, a 413 (over the image's pixel limits) or a 503 ``busy`` (admission control), and the service must
still be live and ready afterwards. docker-check then reports whether the container was OOM-killed or
restarted, and fails if it was: run it with ``DOCKER_RUN_ENV="--memory ... --cpus 2"``.
Prints what it got; exits 1 on the first failed check.

    PORT=18080 .venv/bin/python deploy/smoke.py
    PORT=18080 .venv/bin/python deploy/smoke.py --container docker-check-smoke --read-only
    PORT=18080 .venv/bin/python deploy/smoke.py --revision "$(git rev-parse HEAD)" --stress
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml
from healthcheck import default_bind, first_tcp_bind

CATS = {"tabby", "tiger cat", "Egyptian cat"}
REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
GUNICORN_CMD = ["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
# What the image must hold under /app, and what the build context (.dockerignore) must keep out of it.
APP_FILES = (
    "app.py",
    "gunicorn.conf.py",
    "serving/api.py",
    "model/bundle.py",
    "templates/index.html",
    "static/app.css",
)
KEPT_OUT = ("tests", "training", "bench", ".git", ".venv", "data", "runs", ".env", "deploy/smoke.py", "deploy/k8s")
# Run inside the container with its own Python: the facts the checks below judge, as JSON.
PROBE = r"""
import json, os, shutil, sys, tempfile
from pathlib import Path

def status(pid):
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[1])

processes = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        processes[pid] = {"uid": status(pid), "cmd": [part.decode() for part in cmd if part]}
    except (OSError, KeyError):
        pass  # it ended meanwhile

def writable(folder):
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False

import torch, torchvision
app, models, lists = Path("/app"), Path(sys.argv[1]), Path("/var/lib/apt/lists")
print(json.dumps({
    "processes": processes,
    "prefix": sys.prefix,
    "root_options": [line.split()[3] for line in open("/proc/mounts") if line.split()[1] == "/"][-1:],
    "tmp_writable": writable("/tmp"),
    "app": sorted(str(p.relative_to(app)) for p in app.rglob("*") if "__pycache__" not in p.parts),
    "models": sorted(os.listdir(models)) if models.is_dir() else [],
    "compiler": shutil.which("gcc") or shutil.which("cc"),
    "apt_lists": sorted(p.name for p in lists.glob("*Packages*")) if lists.is_dir() else [],
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "cuda": torch.version.cuda,
}))
"""


class SmokeFailure(Exception):
    pass


def chelsea_png() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / "chelsea.png"


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def wait_ready(base: str, timeout: float) -> requests.Response:
    """/readyz turns 200 once the models are loaded and warm; poll it for a bounded time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(f"{base}/readyz", timeout=5)
            if response.status_code == 200 or time.monotonic() > deadline:
                return response
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def run(base: str, image: Path, ready_timeout: float, expect_model: str | None = None) -> None:
    health = requests.get(f"{base}/healthz", timeout=5)
    print(f"GET /healthz -> {health.status_code} {health.text.strip()}")
    check(health.status_code == 200, "/healthz is not 200")

    ready = wait_ready(base, ready_timeout)
    print(f"GET /readyz -> {ready.status_code} {ready.text.strip()}")
    check(ready.status_code == 200, "/readyz is not 200")

    started = time.perf_counter()
    with image.open("rb") as f:
        response = requests.post(f"{base}/predict", files={"file": (image.name, f, "image/png")}, timeout=60)
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"POST /predict {image.name} -> {response.status_code} in {elapsed_ms:.0f} ms")
    print(json.dumps(response.json(), indent=2))
    check(response.status_code == 200, "/predict is not 200")
    top = response.json()["predictions"][0]["label"]
    if expect_model is not None:
        check(
            response.json()["model"] == expect_model, f"answered by {response.json()['model']!r}, not {expect_model!r}"
        )
    check(top in CATS, f"top answer for chelsea.png is {top!r}, not a cat ({', '.join(sorted(CATS))})")

    with image.open("rb") as f:
        response = requests.post(f"{base}/explain", files={"file": (image.name, f, "image/png")}, timeout=120)
    print(f"POST /explain {image.name} -> {response.status_code}")
    check(response.status_code == 200, f"/explain is not 200: {response.text[:300]}")
    explained = response.json()
    overlay = base64.b64decode(explained["overlay_png"])
    print(f"  explained {explained['explained']['label']!r} at {explained['layer']}, overlay {len(overlay):,} bytes")
    check(explained["explained"]["label"] in CATS, f"/explain explained {explained['explained']!r}, not a cat")
    check(overlay.startswith(b"\x89PNG"), "/explain's overlay_png is not a PNG")

    metrics = requests.get(f"{base}/metrics", timeout=5)
    samples = [line for line in metrics.text.splitlines() if line.startswith("imgclf_images_total")]
    print(f"GET /metrics -> {metrics.status_code}; {'; '.join(samples)}")
    check(metrics.status_code == 200 and samples, "/metrics does not count the classified image")

    static = REPO / "static"
    files = sorted(p for p in static.rglob("*") if p.is_file()) if static.is_dir() else []
    for path in files:
        url = f"{base}/static/{path.relative_to(static).as_posix()}"
        got = requests.get(url, timeout=5)
        print(f"GET {url.removeprefix(base)} -> {got.status_code}, {len(got.content)} bytes")
        check(got.status_code == 200 and len(got.content) > 0, f"{url} is not served from the image")


def version_of_repo() -> str:
    sys.path.insert(0, str(REPO))
    from model import version as release  # the repository's version, with the repository on the path

    return release.__version__


def check_version(base: str, revision: str | None) -> None:
    """GET /version answers the repository's version and the revision the image was built from."""
    got = requests.get(f"{base}/version", timeout=5)
    print(f"GET /version -> {got.status_code} {got.text.strip()}")
    expected = {"version": version_of_repo(), "revision": revision}
    check(got.status_code == 200 and got.json() == expected, f"/version is not {expected}")


def check_labels(image: dict[str, Any], revision: str | None) -> None:
    labels = image.get("Labels") or {}
    expected = {
        "org.opencontainers.image.version": version_of_repo(),
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.revision": revision or "unknown",
    }
    print("labels: " + ", ".join(f"{k.rsplit('.', 1)[1]}={labels.get(k)}" for k in expected))
    wrong = {k: labels.get(k) for k, v in expected.items() if labels.get(k) != v}
    check(not wrong, f"image labels {wrong} differ from {expected}")


def worst_case_png() -> bytes:
    """A 40 MP 16-bit greyscale PNG: about 80 KB on the wire, 80 MB as pixels, more as floats."""
    import numpy as np
    from PIL import Image

    width, height = 8000, 5000
    ramp = np.linspace(0, 65535, width, dtype=np.uint16)
    img = Image.fromarray(np.broadcast_to(ramp, (height, width)).copy())  # uint16: mode I;16
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=9)
    return out.getvalue()


def stress(base: str, image: Path, burst: int) -> None:
    """The worst-case input, then ``burst`` concurrent requests (every fourth an explanation, so that every
    worker holds its torch explainer too); the service must stay up and ready."""
    allowed = {200, 413, 503}
    body = worst_case_png()
    started = time.perf_counter()
    got = requests.post(f"{base}/predict", files={"file": ("worst.png", body, "image/png")}, timeout=120)
    seconds = time.perf_counter() - started
    print(f"POST /predict 40 MP 16-bit PNG ({len(body):,} bytes) -> {got.status_code} in {seconds:.1f} s")
    check(got.status_code in allowed, f"the worst-case input got {got.status_code}: {got.text[:300]}")
    photo = image.read_bytes()

    def one(i: int) -> int:
        route = "/explain" if i % 4 == 0 else "/predict"
        response = requests.post(f"{base}{route}", files={"file": (image.name, photo, "image/png")}, timeout=120)
        if response.status_code == 503:
            check(response.json()["error"]["code"] == "busy" and "Retry-After" in response.headers, "a 503 not 'busy'")
        return response.status_code

    with ThreadPoolExecutor(burst) as pool:
        statuses = list(pool.map(one, range(burst * 4)))
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(f"burst: {len(statuses)} requests from {burst} clients -> {counts}")
    check(set(statuses) <= {200, 503} and counts.get(200, 0) > 0, f"the burst got {counts}")
    for path in ("/healthz", "/readyz"):
        after = requests.get(f"{base}{path}", timeout=5)
        check(after.status_code == 200, f"{path} is {after.status_code} after the stress")
    print("after the stress: /healthz and /readyz 200")


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)  # noqa: S603,S607


def inspect(*args: str) -> dict[str, Any]:
    done = docker(*args)
    check(done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}")
    return json.loads(done.stdout)[0]


def k8s_expectations(folder: Path) -> dict[str, Any]:
    """What the Kubernetes manifests assume about the image: its uid, its port, its model folder."""
    docs = {doc["kind"]: doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return {
        "uid": pod["securityContext"]["runAsUser"],
        "ports": [p["containerPort"] for p in container["ports"]],
        "model_dir": docs["ConfigMap"]["data"]["FLASK_MODEL_DIR"],
    }


def image_problems(config: dict[str, Any], settings: set[str], k8s: dict[str, Any] | None) -> list[str]:
    """What is wrong with an image's configuration (``docker image inspect``'s Config)."""
    problems = []
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    user = config.get("User") or ""
    if not re.fullmatch(r"\d+(:\d+)?", user) or int(user.partition(":")[0]) == 0:
        problems.append(f"USER is {user!r}: it must be a numeric uid other than 0 (runAsNonRoot checks it)")
    ports = sorted(config.get("ExposedPorts") or {})
    bind = first_tcp_bind(env.get("GUNICORN_CMD_ARGS", ""), default_bind(env))  # as gunicorn.conf.py reads them
    if len(ports) != 1 or f"0.0.0.0:{ports[0].partition('/')[0]}" != bind:
        problems.append(f"exposed {ports}, but gunicorn's default bind is {bind}")
    if config.get("Cmd") != GUNICORN_CMD or config.get("Entrypoint"):
        problems.append(
            f"CMD {config.get('Cmd')} / ENTRYPOINT {config.get('Entrypoint')}: want exec-form {GUNICORN_CMD}"
        )
    if config.get("StopSignal") not in (None, "", "SIGTERM"):
        problems.append(f"STOPSIGNAL {config.get('StopSignal')}: gunicorn stops gracefully on SIGTERM")
    test = (config.get("Healthcheck") or {}).get("Test") or []
    if test[:2] != ["CMD", "python"] or not (len(test) > 2 and test[2].startswith("/app/")):
        problems.append(f"HEALTHCHECK {test}: want exec form, Python, a script under /app")
    if not (config.get("Healthcheck") or {}).get("StartPeriod"):
        problems.append("HEALTHCHECK has no --start-period: loading the models would count as failures")
    if not env.get("PATH", "").startswith("/opt/venv/bin:") or env.get("PYTHONUNBUFFERED") != "1":
        problems.append(f"PATH {env.get('PATH')!r}, PYTHONUNBUFFERED {env.get('PYTHONUNBUFFERED')!r}")
    unknown = sorted(k for k in env if k.startswith("FLASK_") and k.removeprefix("FLASK_") not in settings)
    if unknown:
        problems.append(f"{unknown} are not settings of serving/config.py")
    if k8s is not None:
        if re.fullmatch(r"\d+(:\d+)?", user) and int(user.partition(":")[0]) != k8s["uid"]:
            problems.append(f"deploy/k8s runs as uid {k8s['uid']}, the image as {user}")
        if [f"{p}/tcp" for p in k8s["ports"]] != ports:
            problems.append(f"deploy/k8s's containerPort {k8s['ports']}, the image exposes {ports}")
        if k8s["model_dir"] != env.get("FLASK_MODEL_DIR"):
            problems.append(
                f"the ConfigMap's FLASK_MODEL_DIR {k8s['model_dir']}, the image's {env.get('FLASK_MODEL_DIR')}"
            )
    return problems


def container_problems(
    facts: dict[str, Any], uid: int, read_only: bool, pins: dict[str, str], default_model: str
) -> list[str]:
    """What is wrong inside a running container, from PROBE's facts; ``default_model`` is the bundle the
    image bakes into its FLASK_MODEL_DIR (with its ONNX export, so the container starts without exporting)."""
    problems = []
    uids = {info["uid"] for info in facts["processes"].values()}
    if uids != {uid}:
        problems.append(f"processes run as uids {sorted(uids)}, not only {uid}")
    pid1 = facts["processes"].get("1", {}).get("cmd", [])
    if not any("gunicorn" in Path(part).name for part in pid1[:2]) or GUNICORN_CMD[-1] not in " ".join(pid1):
        problems.append(f"PID 1 is {pid1}, not gunicorn")
    if facts["prefix"] != "/opt/venv":
        problems.append(f"python runs from {facts['prefix']}, not the venv /opt/venv")
    root_read_only = "ro" in ",".join(facts["root_options"]).split(",")
    if read_only and (not root_read_only or not facts["tmp_writable"]):
        problems.append(f"read-only root: / is mounted {facts['root_options']}, /tmp writable {facts['tmp_writable']}")
    baked = {f"{default_model}.pth", f"{default_model}.onnx"}
    if not baked <= set(facts["models"]):
        problems.append(f"the image's model folder holds {facts['models']}, not {sorted(baked)}")
    for name, pin in pins.items():
        if facts[name].partition("+")[0] != pin:
            problems.append(f"{name} {facts[name]} in the image, {pin} in requirements-serve.txt")
    if facts["compiler"] or facts["apt_lists"]:
        problems.append(f"the runtime image has a compiler ({facts['compiler']}) or apt lists {facts['apt_lists']}")
    missing = [path for path in APP_FILES if path not in facts["app"]]
    leaked = [path for path in KEPT_OUT if path in facts["app"]]
    if missing or leaked:
        problems.append(f"/app lacks {missing} and holds {leaked}")
    return problems


def pinned_versions() -> dict[str, str]:
    text = (REPO / "requirements-serve.txt").read_text()
    return dict(re.findall(r"^(torch|torchvision)==(\S+)$", text, re.M))


def wait_healthy(container: str, timeout: float) -> str:
    """Docker's own verdict of the HEALTHCHECK (the first one runs one interval after the start)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (inspect("container", "inspect", container)["State"].get("Health") or {}).get("Status", "none")
        if status != "starting" or time.monotonic() > deadline:
            return status
        time.sleep(2)


def check_container(
    container: str, read_only: bool, health_timeout: float, cpu_torch: bool = False, revision: str | None = None
) -> None:
    sys.path.insert(0, str(REPO))
    from serving.config import DEFAULTS  # the repository's settings, with the repository on the path

    state = inspect("container", "inspect", container)
    image = inspect("image", "inspect", state["Image"])["Config"]
    env = dict(item.partition("=")[::2] for item in image.get("Env") or [])
    print(f"image: user {image.get('User')}, ports {sorted(image.get('ExposedPorts') or {})}, cmd {image.get('Cmd')}")
    problems = image_problems(image, set(DEFAULTS), k8s_expectations(K8S))
    check(not problems, "; ".join(problems))
    check_labels(image, revision)

    probe = docker("exec", container, "python", "-c", PROBE, env.get("FLASK_MODEL_DIR", "/app/models"))
    check(probe.returncode == 0, f"the probe failed in the container: {probe.stderr[-2000:]}")
    facts = json.loads(probe.stdout)
    print(f"container: {len(facts['processes'])} processes, torch {facts['torch']}, models {facts['models']}")
    uid = int(image["User"].partition(":")[0])
    problems = container_problems(facts, uid, read_only, pinned_versions(), DEFAULTS["DEFAULT_MODEL"])
    if cpu_torch and facts["cuda"] is not None:
        problems.append(f"torch {facts['torch']} is a CUDA {facts['cuda']} build, not PyTorch's CPU-only wheel")
    check(not problems, "; ".join(problems))

    script = image["Healthcheck"]["Test"][1:]
    health = docker("exec", container, *script)
    print(f"{' '.join(script)} in the container -> exit {health.returncode}")
    check(health.returncode == 0, f"the healthcheck fails in the container: {health.stdout}{health.stderr}")
    status = wait_healthy(container, health_timeout)
    print(f"docker's health status: {status}")
    check(status == "healthy", f"docker says the container is {status}, not healthy")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Smoke-test the service running on 127.0.0.1.")
    p.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8000")), help="port (default: $PORT, else 8000)"
    )
    p.add_argument("--image", type=Path, default=None, help="photo of a cat to post (default: skimage's chelsea.png)")
    p.add_argument("--expect-model", default=None, help="model that must answer (default: any)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /readyz (default: 120)")
    p.add_argument("--container", default=None, help="also check this running container with the docker CLI")
    p.add_argument("--read-only", action="store_true", help="with --container: its root file system must be read-only")
    p.add_argument(
        "--cpu-torch",
        action="store_true",
        help="with --container: torch must be the CPU-only build (an image built with the default TORCH_INDEX_URL)",
    )
    p.add_argument(
        "--health-timeout", type=float, default=90.0, help="seconds to wait for Docker's health verdict (default: 90)"
    )
    p.add_argument(
        "--revision", default=None, help="the source revision the image was built with (default: none, 'unknown')"
    )
    p.add_argument("--stress", action="store_true", help="then send a worst-case input and a burst (see above)")
    p.add_argument("--burst", type=int, default=24, help="concurrent clients of --stress's burst (default: 24)")
    return p


def main(args: argparse.Namespace) -> int:
    base = f"http://127.0.0.1:{args.port}"
    try:
        image = args.image or chelsea_png()
        run(base, image, args.ready_timeout, args.expect_model)
        check_version(base, args.revision)
        if args.container:
            check_container(args.container, args.read_only, args.health_timeout, args.cpu_torch, args.revision)
        if args.stress:
            stress(base, image, args.burst)
    except (
        SmokeFailure,
        requests.RequestException,
        KeyError,
        IndexError,
        ValueError,
        OSError,
        subprocess.SubprocessError,
    ) as exc:
        print(f"SMOKE TEST FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
