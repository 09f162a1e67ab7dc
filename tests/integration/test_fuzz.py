"""Schemathesis (its CLI, v4) against the live stack's OpenAPI schema: every route, with a tenant's API key.

Checks: no 5xx, status codes, content types, response bodies and headers as the schema documents them.
A modest number of examples per operation keeps the run well under 90 s; the hostile inputs that matter
most have their own end-to-end tests in ``test_hostile.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MAX_EXAMPLES = 12
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance"
)


def test_api_conforms_to_its_schema(stack: Any, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    command = [
        str(cli),
        "run",
        f"{stack.api_url}/openapi.json",
        "-H",
        f"Authorization: Bearer {stack.api_key}",
        "-c",
        CHECKS,
        "-n",
        str(MAX_EXAMPLES),
        "--seed",
        "1",
        "--generation-deterministic",
        "--request-timeout",
        "30",
        "--phases",
        "examples,coverage,fuzzing",
        "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    # the key must never be echoed into the report (it is redacted as a sensitive header)
    assert stack.api_key not in output
    assert result.returncode == 0, output[-6000:]
