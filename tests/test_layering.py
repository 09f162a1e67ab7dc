"""The dependency rules between packages, checked on what a process actually loads (docs/architecture.md).

`make lint` checks the same rules statically (import-linter contracts in pyproject.toml); these tests
import each entry point in a fresh interpreter and look at ``sys.modules``, which also catches an
import done inside a function or through a package ``__init__``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE = ("fastapi", "starlette", "celery", "kombu", "redis", "boto3", "botocore")
OURS = ("mudsc_core", "mudsc_jobs", "mudsc_client", "app", "worker")


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env, cwd=REPO, timeout=120
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_api_process_starts_without_torch() -> None:
    loaded = loaded_after(
        "from mudsc_jobs.settings import Settings\nfrom app.main import create_app\ncreate_app(Settings())"
    )
    assert "fastapi" in loaded  # the probe did build the app
    assert not loaded & {"torch", "safetensors", "worker", "mudsc_client"}


def test_the_worker_parent_imports_no_torch() -> None:
    # The Celery parent forks the pool: torch (and CUDA) must only come in inside the task.
    loaded = loaded_after("import worker.celery_app, worker.tasks")
    assert "celery" in loaded
    assert not loaded & {"torch", "app", "fastapi", "mudsc_client"}


def test_the_core_imports_no_service_code() -> None:
    loaded = loaded_after(
        "import mudsc_core, mudsc_core.files, mudsc_core.permutation.merge, mudsc_core.same_base.stream, mudsc_core.io"
    )
    assert "torch" in loaded
    assert not loaded & {*SERVICE, "httpx", "mudsc_jobs", "mudsc_client", "app", "worker"}


def test_the_client_imports_neither_service_nor_core() -> None:
    loaded = loaded_after("import mudsc_client, mudsc_client.cli")
    assert "httpx" in loaded
    assert not loaded & {*SERVICE, "torch", "pydantic", "mudsc_core", "mudsc_jobs", "app", "worker"}


def test_the_client_distribution_asks_only_for_client_dependencies() -> None:
    requires = {
        r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
        for r in metadata.requires("mudsc-client") or []
    }
    assert requires == {"httpx", "pyyaml"}


def test_client_and_server_agree_on_terminal_statuses() -> None:
    from mudsc_client import TERMINAL
    from mudsc_jobs.store import TERMINAL as SERVER_TERMINAL

    assert set(TERMINAL) == set(SERVER_TERMINAL)


@pytest.mark.slow
def test_the_client_installs_alone(tmp_path: Path) -> None:
    """A fresh virtualenv with only ``pip install ./client``: the CLI runs, no server package came along."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", str(REPO / "client")], check=True, timeout=300, capture_output=True
    )
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "mudsc-client" in names and "httpx" in names
    assert not names & {"torch", "fastapi", "celery", "redis", "boto3", "mudsc", "pydantic"}
    help_text = subprocess.run(
        [env_dir / "bin" / "mudsc", "--help"], check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path
    ).stdout
    assert "submit" in help_text and "download" in help_text
