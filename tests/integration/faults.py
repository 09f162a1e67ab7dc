"""Shared helpers of the fault-injection tests: the job API round trip, output checks, and network hosts.

- ``submit``/``wait``/``done``/``running``/``status_events``: drive and observe a job through the API.
- ``output_keys``/``assert_no_result``/``assert_clean_success``: what a job left under its output prefix.
- ``NetLab``: "hosts" as network namespaces of this machine, each joined to the root namespace by a veth
  pair in a private /30 of 10.213.N.0/24 that no interface here uses; one service address (its own veth pair)
  for the servers the hosts reach; a host's link can be cut and healed, or rate-limited. Everything it made
  is deleted by ``close()`` (namespaces whose creator died are deleted by the next ``NetLab``).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scripts.localstack import worker_command as stack_worker_command

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "canceled"}


# ----------------------------------------------------------------------------------------------- jobs
def submit(api: httpx.Client, body: dict[str, Any]) -> str:
    response = api.post("/v1/merges", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait(api: httpx.Client, job_id: str, predicate: Any, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = api.get(f"/v1/merges/{job_id}")
        if response.status_code == 200:
            job = response.json()
            if predicate(job):
                return job
        time.sleep(0.1)
    raise AssertionError(
        f"job {job_id}: expected state not reached; last {job.get('status')} "
        f"attempt {job.get('attempt')} {job.get('progress')} {job.get('error')}"
    )


def done(job: dict[str, Any]) -> bool:
    return job["status"] in TERMINAL


def running(attempt: int, stage: str | None = None) -> Any:
    return lambda j: (
        j["status"] == "running"
        and j["attempt"] == attempt
        and j["progress"] is not None
        and (stage is None or j["progress"]["stage"] == stage)
    )


def status_events(api: httpx.Client, job_id: str) -> list[tuple[str, int]]:
    events = api.get(f"/v1/merges/{job_id}/events").json()["data"]
    return [(e["data"]["status"], e["data"].get("attempt")) for e in events if e["type"] == "status"]


def output_keys(stack: Any, job: dict[str, Any]) -> list[str]:
    bucket, _, prefix = job["spec"]["output"]["uri"][len("s3://") :].partition("/")
    listing = stack.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"][len(prefix) :] for o in listing.get("Contents", [])]


def assert_no_result(stack: Any, job: dict[str, Any]) -> None:
    """Nothing that looks like a result: no weights, no staging leftovers (a status manifest may exist)."""
    keys = output_keys(stack, job)
    assert not any(k.endswith(".safetensors") or ".staging-" in k or k == "report.json" for k in keys), keys


def assert_clean_success(stack: Any, job: dict[str, Any]) -> None:
    assert job["status"] == "succeeded", job
    keys = output_keys(stack, job)
    assert "model.safetensors" in keys and not any(".staging-" in k for k in keys), keys


def wait_for_log(path: Path, text: str, timeout_s: float, offset: int = 0) -> float:
    """Wait until ``text`` appears in the log at ``path`` after byte ``offset``; returns when (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as log:
            log.seek(offset)
            if text.encode() in log.read():
                return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} did not appear in {path.name} within {timeout_s:.0f}s")
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------- network hosts
NS_PREFIX = "mudscp-"  # namespaces: mudscp-<creator pid>-<tag>-<host>


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _tc(*args: str, ns: str | None = None) -> None:
    cmd = [*(["ip", "netns", "exec", ns] if ns else []), "tc", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


def netns_unavailable_reason() -> str | None:
    """Why network namespaces with veth pairs cannot be made here, or None when they can (a real probe)."""
    if sys.platform != "linux":
        return f"network namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces and veth pairs needs root (euid is not 0)"
    if shutil.which("ip") is None:
        # The project's own installer (iproute2 with apt-get), as on a fresh CI machine.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["bash", str(REPO_ROOT / "scripts" / "ensure_deps.sh"), "net"],
                capture_output=True,
                timeout=300,
            )
        if shutil.which("ip") is None:
            return "the 'ip' command (iproute2) is missing and scripts/ensure_deps.sh net could not install it"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    link = f"mzq{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", link, "type", "veth", "peer", "name", link + "p", "netns", probe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace with a veth pair here: {exc}"
    finally:
        _ip("link", "del", link, check=False)
        _ip("netns", "del", probe, check=False)
    return None


def netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


@dataclass
class Host:
    """One worker host: namespace ``ns``; ``host_if`` (root side, address ``gateway``) <-> ``ns_if`` (``address``)."""

    name: str
    ns: str
    host_if: str
    ns_if: str
    gateway: str
    address: str
    cut: bool = False


class NetLab:
    def __init__(self) -> None:
        self._delete_stale()
        self.tag = secrets.token_hex(2)
        self.subnet = self._free_subnet()
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._links: list[str] = []
        self.service_address = ""

    # -------------------------------------------------------------- setup
    @staticmethod
    def _delete_stale() -> None:
        """Namespaces of an earlier run whose creating process is gone (a killed pytest): delete them."""
        listing = _ip("netns", "list", check=False).stdout
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            parts = name.split("-")
            if name.startswith(NS_PREFIX) and len(parts) >= 3 and parts[1].isdigit():
                if not Path(f"/proc/{parts[1]}").exists():
                    _ip("netns", "del", name, check=False)

    @staticmethod
    def _free_subnet() -> int:
        used = _ip("-4", "addr", check=False).stdout + _ip("-4", "route", "show", "table", "all", check=False).stdout
        candidates = list(range(16, 250))
        random.shuffle(candidates)
        for n in candidates:
            if f"10.213.{n}." not in used:
                return n
        raise RuntimeError("no free 10.213.N.0/24 for the test's hosts")

    def _namespace(self, name: str) -> str:
        ns = f"{NS_PREFIX}{os.getpid()}-{self.tag}-{name}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)
        return ns

    def _pair(self, role: str, ns: str) -> tuple[str, str]:
        host_if, ns_if = f"mzp{self.tag}{role}h", f"mzp{self.tag}{role}n"
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        self._links.append(host_if)
        return host_if, ns_if

    def add_service_address(self) -> str:
        """10.213.N.1 on a veth whose peer sits in a namespace of its own (nothing runs there): an address of
        the root namespace that stays up whichever host's link is cut, for the servers every host reaches."""
        ns = self._namespace("svc")
        host_if, ns_if = self._pair("s", ns)
        self.service_address = f"10.213.{self.subnet}.1"
        _ip("addr", "add", f"{self.service_address}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("link", "set", ns_if, "up", ns=ns)
        return self.service_address

    def add_host(self, name: str) -> Host:
        """A namespace with 10.213.N.(4i+6)/30; its default route goes through the root side (.4i+5), so it
        reaches the service address (the root namespace answers for its own addresses on any interface)."""
        index = len(self.hosts) + 1
        base = 4 * index
        ns = self._namespace(name)
        host_if, ns_if = self._pair(name[:1], ns)
        host = Host(name, ns, host_if, ns_if, f"10.213.{self.subnet}.{base + 1}", f"10.213.{self.subnet}.{base + 2}")
        _ip("addr", "add", f"{host.gateway}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("addr", "add", f"{host.address}/30", "dev", ns_if, ns=ns)
        _ip("link", "set", ns_if, "up", ns=ns)
        _ip("route", "add", "default", "via", host.gateway, ns=ns)
        self.hosts[name] = host
        return host

    # -------------------------------------------------------------- faults
    def cut(self, host: Host) -> None:
        """Partition ``host``: its own side of the link goes down (routes through it go with it, so every packet
        it sends fails at once: ENETUNREACH), while its processes keep running."""
        _ip("link", "set", host.ns_if, "down", ns=host.ns)
        host.cut = True

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.ns_if, "up", ns=host.ns)
        _ip("route", "replace", "default", "via", host.gateway, ns=host.ns)  # removed with the link
        host.cut = False

    def shape(self, host: Host, rate: str) -> None:
        """Limit ``host``'s link to ``rate`` (tc tbf) in both directions: transfers take seconds, not ms."""
        for dev, ns in ((host.host_if, None), (host.ns_if, host.ns)):
            _tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "500ms", ns=ns)

    def unshape(self, host: Host) -> None:
        for dev, ns in ((host.host_if, None), (host.ns_if, host.ns)):
            with contextlib.suppress(RuntimeError):
                _tc("qdisc", "del", "dev", dev, "root", ns=ns)

    # -------------------------------------------------------------- teardown
    def close(self) -> None:
        """Delete every link and namespace made here (stop the processes inside first); never raises."""
        for link in self._links:
            _ip("link", "del", link, check=False)  # deletes its peer too
        for ns in self._namespaces:
            _ip("netns", "del", ns, check=False)
        self._links.clear()
        self._namespaces.clear()

    def leftovers(self) -> list[str]:
        names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()]
        mine = [n for n in names if n.startswith(f"{NS_PREFIX}{os.getpid()}-{self.tag}-")]
        links = _ip("-o", "link", "show", check=False).stdout
        return mine + [link for link in (f"mzp{self.tag}",) if link in links]


def worker_command(name: str, ns: str | None = None, concurrency: int = 1) -> list[str]:
    """The local stack's Celery worker command line, run inside network namespace ``ns`` if given."""
    cmd = stack_worker_command(name, concurrency)
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd
