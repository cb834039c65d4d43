"""gunicorn settings for ``gunicorn --config gunicorn.conf.py "app:create_app()"`` (what `make run` does).

The choices, and why:
- Before any worker starts, the master runs `python -m serving.prepare` once, in a process of its own
  that then exits: it picks the backend and device (FLASK_BACKEND=auto: the GPU when there is one,
  else ONNX Runtime on the CPU), builds the default model when missing, exports each bundle to ONNX when
  its export is missing or stale, checks every export against its bundle, and writes the manifest the
  workers serve from (serving/manifest.py). A bad model folder stops the start there, with one message.
  So neither the master nor an ONNX worker ever imports torch. SIGHUP prepares again (new models).
- One worker process per CPU this server may use (its affinity and its container's CPU quota, model/cpus.py;
  at most 32, serving/sizing.py),
  each running the model on one thread (FLASK_TORCH_THREADS = CPUs // workers): decoding a photo costs
  about as much CPU as the model, and processes side by side keep every core busy where threads of one
  process would queue on its GIL. On a GPU host, a few workers share the card (one per 4 CPUs, at most
  4). WEB_CONCURRENCY sets the number of workers; the model threads follow.
- 24 gthread request threads per worker: up to 3 per model thread (FLASK_MAX_INFLIGHT, at most 6) decode
  and preprocess uploads in parallel and hand their uint8 arrays to the worker's dynamic batcher, which
  runs one forward pass for whatever is waiting (up to FLASK_BATCH_MAX_SIZE images: 8 on a CPU, 32 on a
  GPU); the others wait for a slot (FLASK_ADMISSION_WAIT_MS) instead of being refused; 2 always answer
  probes (serving/admission.py). More request threads: GUNICORN_THREADS. Both can also be given on the
  command line or in GUNICORN_CMD_ARGS.
- Each worker makes glibc keep freed memory (serving/allocator.py, in post_fork: mmap and trim thresholds
  raised, checked with a probe): otherwise glibc returns large freed blocks to the kernel and every
  batched forward pass faults its activations back in. And it caps glibc's arenas at one per model thread
  plus the main one (MALLOC_ARENA_MAX, when set, wins), so that the request threads do not each keep the
  peak of their own photos.
- bind 127.0.0.1:8000: local only. $PORT (as Cloud Run and Heroku give it) changes the port and
  $IMGCLF_HOST the host (the image sets 0.0.0.0); a --bind on the command line or in GUNICORN_CMD_ARGS
  wins over both.
- timeout 60 s: a worker stuck that long is restarted; a request normally takes tens of milliseconds.
- GUNICORN_READ_TIMEOUT (default 20 s): a client must send each whole request (headers and body) within
  it, or its connection is closed: trickling clients (slowloris) cannot hold the request threads.
- access log on stdout (without query strings or user names: they may hold secrets), error log on stderr;
  control characters in any logged line escaped (serving/logs.py).
- Prometheus multiprocess mode: every worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR
  (a fresh temporary folder unless already set) so /metrics adds up all workers; a dead worker's
  files are marked, and the folder is removed when gunicorn exits.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# the start-up step's folder for the manifest (mkdtemp's prefix): only such a folder is ever removed
_MANIFEST_FOLDER_PREFIX = "imgclf-manifest-"


def _default_bind(environ=os.environ):
    """Where to listen when no --bind is given (GUNICORN_CMD_ARGS and the command line win over this file):
    port $PORT (Cloud Run, Heroku and the like give it), else 8000; host $IMGCLF_HOST (the image sets
    0.0.0.0), else 127.0.0.1. deploy/healthcheck.py's default_bind says the same (a test compares them)."""
    port = environ.get("PORT") or "8000"
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"PORT must be a TCP port number from 1 to 65535, not {port!r}")
    host = environ.get("IMGCLF_HOST") or "127.0.0.1"
    if ":" in host and not host.startswith("["):  # an IPv6 address: [::]:8080
        host = f"[{host}]"
    return [f"{host}:{int(port)}"]


bind = _default_bind()


def _default_workers(environ=os.environ):
    """WEB_CONCURRENCY, else one per CPU this process may use (serving/sizing.py; a GPU host is resized
    once the start-up step has seen the GPU, in on_starting)."""
    from model.cpus import available_cpus
    from serving.sizing import cpu_sizing

    if environ.get("WEB_CONCURRENCY"):
        return int(environ["WEB_CONCURRENCY"])
    return cpu_sizing(available_cpus()).workers


workers = _default_workers()
# gthread plus a deadline for receiving each request (serving/worker.py): slow clients cannot hold threads
worker_class = "serving.worker.DeadlineThreadWorker"
threads = int(os.environ.get("GUNICORN_THREADS", "24"))
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
# No query string (a client may put a key or token there by mistake), no Basic-auth user name (gunicorn
# would log `curl -u KEY:`'s key as the user) and no Referer; the request id ties a line to the app's log.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms "%(a)s" id=%({x-request-id}o)s'
errorlog = "-"
# control characters in every logged line are escaped (`GET /%0Afake-line` cannot write a line of its own)
logger_class = "serving.logs.EscapingLogger"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
# models are loaded in each worker after the fork (no preload): threads and torch's pools start there
preload_app = False
# gunicorn 27's control socket defaults to one fixed path per user ($HOME/.gunicorn/gunicorn.ctl), so two
# servers on one machine (tests, a second instance) would fight over it; nothing here uses it.
control_socket_disable = True

# Must be in the environment before any worker imports prometheus_client.
_OWNED_FLAG = "IMGCLF_PROMETHEUS_DIR_OWNED"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imgclf-prometheus-")
    os.environ[_OWNED_FLAG] = "1"


def on_starting(server):
    from serving.logs import escape_handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    escape_handlers(logging.getLogger())  # the app's own lines quote paths, file names, model names
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # samples of an earlier run would be added to ours
        stale.unlink()
    server.log.info("Prometheus multiprocess folder: %s", metrics_dir)
    _prepare_models(server)


def on_reload(server):
    _prepare_models(server)  # SIGHUP: retrained bundles are checked (and exported) before new workers start


def _prepare_models(server):
    """Run serving.prepare in its own process (torch is loaded there, and gone when it exits) and point
    the workers at the manifest it writes; a model folder that cannot be served stops the start."""
    from model.cpus import available_cpus
    from serving.manifest import MANIFEST_ENV, read_manifest
    from serving.sizing import gpu_sizing

    folder = Path(tempfile.mkdtemp(prefix=_MANIFEST_FOLDER_PREFIX))  # mode 0700
    manifest = folder / "models.json"
    command = [sys.executable, "-m", "serving.prepare", "--manifest", str(manifest)]
    done = subprocess.run(command, check=False)  # noqa: S603 - our own module, no outside input
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        server.log.error("not starting: the settings or the models cannot be served (the reason is above)")
        sys.exit(3)  # gunicorn's own exit status when a worker cannot boot
    _remove_manifest_folder(os.environ.get(MANIFEST_ENV))  # SIGHUP: the previous start's
    os.environ[MANIFEST_ENV] = str(manifest)
    device = read_manifest(manifest).device
    if device == "cuda" and not os.environ.get("WEB_CONCURRENCY"):
        server.num_workers = gpu_sizing(available_cpus()).workers
    server.log.info("serving on %s with %d worker(s)", device, server.num_workers)


def _remove_manifest_folder(manifest):
    if manifest and Path(manifest).parent.name.startswith(_MANIFEST_FOLDER_PREFIX):
        shutil.rmtree(Path(manifest).parent, ignore_errors=True)


def post_fork(server, worker):
    from model.cpus import available_cpus
    from serving.allocator import tune_glibc_malloc
    from serving.sizing import model_threads

    if "FLASK_TORCH_THREADS" not in os.environ:
        os.environ["FLASK_TORCH_THREADS"] = str(model_threads(available_cpus(), server.num_workers))
    # the default admission limit (FLASK_MAX_INFLIGHT, serving/config.py) keeps some of these for probes
    os.environ["IMGCLF_REQUEST_THREADS"] = str(server.cfg.threads)
    # one malloc arena per model thread, and the main one: request threads do not each keep their own peak
    model_threads_here = int(os.environ["FLASK_TORCH_THREADS"]) if os.environ["FLASK_TORCH_THREADS"].isdigit() else 1
    tune_glibc_malloc(arena_max=max(1, model_threads_here) + 1)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_int(worker):
    _drain(worker)


def worker_exit(server, worker):
    _drain(worker)


def _drain(worker):
    """The models close as the worker goes: queued inference is answered first. (Readiness already
    turned 503 when SIGTERM arrived: serving/worker.py's handle_exit.)"""
    from serving.worker import models_of

    registry = models_of(worker)
    if registry is not None:
        registry.close()


def on_exit(server):
    from serving.manifest import MANIFEST_ENV

    _remove_manifest_folder(os.environ.get(MANIFEST_ENV))
    if os.environ.get(_OWNED_FLAG) == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
