"""The Dockerfile, .dockerignore, the healthcheck and smoke scripts, and the Kubernetes manifests.

Cheap checks that run in the normal suite: the image's invariants read from the Dockerfile itself,
the manifests validated against Kubernetes' own schemas (kubernetes-validate, offline), and every probe,
port and setting they name checked against the real app (built with the real default model). The
image itself is built and smoke-tested by .ci/run through ../shared/tools/docker-check.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, closing_app, tiny_bundle
from werkzeug.serving import make_server

from app import create_app
from bench.servers import free_port
from serving.config import DEFAULTS

sys.path.insert(0, str(ROOT / "deploy"))
import healthcheck  # noqa: E402
import smoke  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
MANIFESTS = ("configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
# Kubernetes versions the manifests must be valid for: the oldest and the newest schemas bundled.
K8S_VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version())


# --- the Dockerfile, read as instructions --------------------------------------------------------


def parse_dockerfile(text: str) -> list[list[tuple[str, str]]]:
    """Stages of (INSTRUCTION, arguments), with line continuations joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for entry in logical:
        instruction, _, args = entry.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for args in instructions(stage, "ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def runtime(stages) -> list[tuple[str, str]]:
    return stages[-1]


def bind_port(gunicorn_cmd_args: str) -> int:
    return int(healthcheck.first_tcp_bind(gunicorn_cmd_args).rpartition(":")[2])


def image_uid(runtime) -> int:
    (user,) = instructions(runtime, "USER")
    return int(user.partition(":")[0])


def test_dockerfile_is_multi_stage_on_python_slim_and_copies_the_venv(stages, runtime):
    assert len(stages) >= 2
    for stage in stages:
        assert instructions(stage, "FROM")[0].split()[0] == "python:3.11-slim"
    builder = stages[0]
    assert any("python -m venv /opt/venv" in run for run in instructions(builder, "RUN"))
    assert any(arg.startswith("--from=builder /opt/venv") for arg in instructions(runtime, "COPY"))
    assert env_of(runtime)["PATH"].startswith("/opt/venv/bin:")
    # the runtime stage installs nothing itself: no pip, no compiler, no apt
    assert not any(re.search(r"\b(pip|apt-get|apt)\b", run) for run in instructions(runtime, "RUN"))


def test_torch_comes_from_the_cpu_index_unless_the_build_arg_is_empty(stages):
    builder = stages[0]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in instructions(builder, "ARG")
    (install,) = [run for run in instructions(builder, "RUN") if "TORCH_INDEX_URL" in run]
    assert '[ -n "$TORCH_INDEX_URL" ]' in install
    assert '--index-url "$TORCH_INDEX_URL"' in install
    assert "-r requirements-serve.txt" in install
    # the torch pins the Dockerfile greps for exist in the one file that keeps them
    pins = re.findall(r"^(torch|torchvision)==\S+$", (ROOT / "requirements-serve.txt").read_text(), re.M)
    assert sorted(pins) == ["torch", "torchvision"]


def test_requirements_keep_every_pin_in_one_place():
    serve = (ROOT / "requirements-serve.txt").read_text()
    full = (ROOT / "requirements.txt").read_text()
    assert "-r requirements-serve.txt" in full.splitlines()

    def names(text: str) -> set[str]:
        return {m.lower() for m in re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)}

    assert not names(serve) & names(full), "a package pinned twice"
    assert {"torch", "torchvision", "flask", "gunicorn", "prometheus-client"} <= names(serve)


def test_the_default_model_is_baked_where_the_image_serves_from(stages, runtime):
    (build,) = [run for run in instructions(stages[0], "RUN") if "model.default" in run]
    out = Path(re.search(r"--out (\S+)", build).group(1))
    assert out.name == f"{DEFAULTS['DEFAULT_MODEL']}.pth"
    assert env_of(runtime)["FLASK_MODEL_DIR"] == str(out.parent)
    assert any(arg == f"--from=builder {out.parent} {out.parent}" for arg in instructions(runtime, "COPY"))


def test_runtime_runs_as_a_numeric_non_root_user(runtime):
    (user,) = instructions(runtime, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), "USER must be numeric (Kubernetes runAsNonRoot checks it)"
    assert image_uid(runtime) != 0
    # nothing runs as root after the USER line
    position = [instruction for instruction, _ in runtime].index("USER")
    assert "RUN" not in [instruction for instruction, _ in runtime[position:]]


def test_expose_matches_the_default_bind(runtime):
    env = env_of(runtime)
    assert instructions(runtime, "EXPOSE") == ["8000"]
    assert bind_port(env["GUNICORN_CMD_ARGS"]) == 8000
    assert healthcheck.first_tcp_bind(env["GUNICORN_CMD_ARGS"]) == "0.0.0.0:8000"
    assert env["PYTHONUNBUFFERED"] == "1"
    for key in env:
        if key.startswith("FLASK_"):
            assert key.removeprefix("FLASK_") in DEFAULTS, f"{key} is not a setting"


def test_cmd_is_exec_form_gunicorn_so_it_is_pid_1(runtime):
    (cmd,) = instructions(runtime, "CMD")
    argv = json.loads(cmd)
    assert argv == ["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
    assert not instructions(runtime, "ENTRYPOINT")
    assert instructions(runtime, "STOPSIGNAL") in ([], ["SIGTERM"])
    assert (ROOT / "gunicorn.conf.py").is_file()


def test_healthcheck_uses_python_and_the_script_is_in_the_image(runtime):
    (check,) = instructions(runtime, "HEALTHCHECK")
    argv = json.loads(check.partition("CMD")[2])
    assert argv[0] == "python"
    script = Path(argv[1])
    assert script.parts[:2] == ("/", "app")
    relative = script.relative_to("/app")
    assert (ROOT / relative).is_file()
    assert docker_context_includes(relative.as_posix())
    assert "--start-period" in check


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


def test_healthcheck_fails_while_the_service_drains(tmp_path, monkeypatch):
    tiny_bundle(tmp_path / "tiny.pth", ["a", "b"])
    draining = create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "tiny"})
    draining.extensions["imgclf.models"].close()  # what gunicorn.conf.py does on SIGTERM
    with serve(draining) as drained_port:
        monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--bind 0.0.0.0:{drained_port}")
        assert healthcheck.main(healthcheck.get_args_parser().parse_args([])) == 1


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


def test_ports_match_the_image(manifests, container, runtime):
    (port,) = container["ports"]
    assert port["containerPort"] == int(instructions(runtime, "EXPOSE")[0])
    assert port["containerPort"] == bind_port(env_of(runtime)["GUNICORN_CMD_ARGS"])
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


def test_configmap_values_make_a_working_app(manifests, model_dir, runtime, monkeypatch):
    data = manifests["ConfigMap"]["data"]
    assert data["FLASK_MODEL_DIR"] == env_of(runtime)["FLASK_MODEL_DIR"]  # the image's baked default
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


def test_pods_run_non_root_on_a_read_only_root(pod, container, runtime):
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image_uid(runtime)
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
