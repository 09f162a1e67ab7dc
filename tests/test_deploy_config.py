"""The deployment files agree with the code: compose and Dockerfiles start modules that exist, use only
settings that exist, and copy files that exist. No Docker engine needed."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from mudsc_jobs.settings import Settings
from scripts.localstack import LocalStack
from scripts.settings_table import env_names, replace_table

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = sorted(p for p in (REPO / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
MUDSC_VAR = re.compile(r"\bMUDSC_[A-Z0-9_]+")
# Client-side variables (read by client/mudsc_client/cli.py, scripts/demo.py and written to .stack/env), not server settings.
CLIENT_VARS = {
    "MUDSC_API_URL",
    "MUDSC_API_KEY",
    "MUDSC_TENANT",
    "MUDSC_OTHER_API_KEY",
    "MUDSC_OTHER_TENANT",
    "MUDSC_S3_ENDPOINT",
    "MUDSC_S3_ACCESS_KEY",
    "MUDSC_S3_SECRET_KEY",
    "MUDSC_S3_REGION",
    "MUDSC_MODELS_BUCKET",
    "MUDSC_DATA_BUCKET",
    "MUDSC_RESULTS_BUCKET",
    "MUDSC_REDIS_URL",
    "MUDSC_WEBHOOK_SECRET",  # the demo tenant's webhook secret, for a local receiver to verify deliveries
    "MUDSC_PUBLIC_S3_URL",  # compose interpolation input, mapped onto MUDSC_S3__PUBLIC_ENDPOINT_URL
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _command(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def _dockerfile_cmd(path: Path) -> list[str]:
    cmds = [line for line in _instructions(path) if line.upper().startswith("CMD ")]
    assert cmds, f"{path.name} has no CMD"
    return json.loads(cmds[-1][4:])


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                joined.append(current.strip())
            current = ""
    return joined


def _assert_attribute_defined(module: str, attribute: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"module {module} does not exist"
    tree = ast.parse(Path(spec.origin).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    assert attribute in names, f"{module} defines no top-level {attribute!r}"


def _assert_entry_point(cmd: list[str]) -> None:
    """The module:attribute an api (uvicorn) or worker (celery) command starts exists in the package."""
    if cmd and cmd[0] == "uvicorn":
        target = next(arg for arg in cmd[1:] if not arg.startswith("-"))
        module, _, attribute = target.partition(":")
        _assert_attribute_defined(module, attribute)
        if "--factory" in cmd:
            assert attribute.startswith("create"), "a --factory target should be a factory function"
    elif cmd and cmd[0] == "celery":
        target = cmd[cmd.index("-A") + 1]
        module, _, attribute = target.partition(":")
        _assert_attribute_defined(module, attribute or "app")
        assert cmd[cmd.index("-Q") + 1] == Settings().celery.queue, "the worker must consume the queue the API sends to"
    else:
        raise AssertionError(f"unexpected command {cmd}")


def test_webhook_sender_consumes_the_webhooks_queue_without_a_gpu(compose: dict[str, Any]) -> None:
    service = compose["services"]["webhooks"]
    cmd = _command(service["command"])
    _assert_attribute_defined(*cmd[cmd.index("-A") + 1].split(":"))
    assert cmd[cmd.index("-Q") + 1] == Settings().webhooks.queue
    assert "deploy" not in service, "webhook senders need no GPU"


def test_compose_parses_and_has_the_services(compose: dict[str, Any]) -> None:
    assert {"redis", "minio", "createbuckets", "api", "worker", "flower"} <= set(compose["services"])


def test_redis_keeps_an_append_only_file(compose: dict[str, Any]) -> None:
    cmd = _command(compose["services"]["redis"]["command"])
    assert cmd[cmd.index("--appendonly") + 1] == "yes"


def test_buckets_are_created_for_the_results_bucket_setting(compose: dict[str, Any]) -> None:
    script = " ".join(_command(compose["services"]["createbuckets"]["command"]))
    env = compose["services"]["api"]["environment"]
    for bucket in ("models", "data", env["MUDSC_S3__RESULTS_BUCKET"]):
        assert f"local/{bucket}" in script


def test_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_commands_start_existing_entry_points(compose: dict[str, Any], service: str) -> None:
    _assert_entry_point(_command(compose["services"][service]["command"]))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_cmd_starts_an_existing_entry_point(dockerfile: Path) -> None:
    _assert_entry_point(_dockerfile_cmd(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist(dockerfile: Path) -> None:
    copies = [line for line in _instructions(dockerfile) if line.split()[0].upper() in ("COPY", "ADD")]
    assert copies
    for line in copies:
        parts = [p for p in shlex.split(line)[1:] if not p.startswith("--")]
        for source in parts[:-1]:  # build context is the repository root
            assert (REPO / source).exists(), f"{dockerfile.name}: {line!r} copies missing {source}"


def test_compose_builds_dockerfiles_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), name


def test_worker_image_keeps_the_base_images_torch() -> None:
    text = (REPO / "docker" / "Dockerfile.worker").read_text()
    assert re.search(r"^ARG PYTORCH_IMAGE=pytorch/pytorch:\S+-cuda\S+-runtime$", text, re.M)
    assert "'.[gpu]'" in text and "-c /tmp/torch-constraint.txt" in text


def test_api_image_has_no_torch() -> None:
    import tomllib

    installs = [line for line in _instructions(REPO / "docker" / "Dockerfile.api") if "pip install" in line]
    assert installs and all("[" not in line and "torch" not in line.split("&&")[0] for line in installs)
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if d.startswith("torch")], "the API image installs only base dependencies"


def _compose_env_names(compose: dict[str, Any]) -> set[str]:
    names = set(MUDSC_VAR.findall(COMPOSE.read_text()))
    for service in compose["services"].values():
        env = service.get("environment") or {}
        names.update(
            k for k in (env if isinstance(env, dict) else [e.split("=")[0] for e in env]) if k.startswith("MUDSC_")
        )
    return names


def test_every_mudsc_variable_is_a_setting(compose: dict[str, Any], tmp_path: Path) -> None:
    known = env_names()
    used = {
        "docker-compose.yml": _compose_env_names(compose),
        **{path.name: set(MUDSC_VAR.findall(path.read_text())) for path in DOCKERFILES},
        "scripts/localstack.py settings_env()": set(LocalStack(tmp_path).settings_env()),
    }
    for source, names in used.items():
        unknown = sorted(names - known - CLIENT_VARS)
        assert not unknown, f"{source} uses {unknown}, which are not fields of mudsc_jobs.settings.Settings"


def test_localstack_env_is_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = LocalStack(tmp_path)
    stack.api_key, stack.other_api_key = "key-a", "key-b"
    stack.redis_url, stack.s3_endpoint = "redis://127.0.0.1:6379/3", "http://127.0.0.1:9"
    for name, value in stack.settings_env().items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert [k.tenant for k in settings.auth.api_keys] == ["demo", "other"]
    assert settings.s3.results_bucket == stack.buckets["results"]
    assert settings.broker_url == settings.redis.url == stack.redis_url


def test_compose_env_is_valid_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    api_keys = json.dumps([{"tenant": "demo", "key_sha256": "0" * 64, "allowed_prefixes": ["s3://models/"]}])
    interpolated = {"MINIO_ROOT_PASSWORD": "secret", "MUDSC_AUTH__API_KEYS": api_keys}

    def interpolate(value: str) -> str:
        # ${NAME:-default} / ${NAME:?message} as compose does, with the values above.
        return re.sub(
            r"\$\{(\w+)(?::([-?])([^}]*))?\}",
            lambda m: interpolated.get(m.group(1), m.group(3) if m.group(2) == "-" else ""),
            value,
        )

    for service in ("api", "worker"):
        for name, value in compose["services"][service]["environment"].items():
            monkeypatch.setenv(name, interpolate(str(value)))
        settings = Settings()
        assert settings.s3.endpoint_url == "http://minio:9000"
        assert settings.auth.api_keys[0].tenant == "demo"


def test_readme_settings_table_is_current() -> None:
    readme = (REPO / "README.md").read_text()
    assert replace_table(readme) == readme, "regenerate it: python scripts/settings_table.py --write README.md"
