"""``mudsc``: the command-line client of the merge service (torch-free).

    mudsc submit spec.yaml --wait     submit a job spec (YAML or JSON; '-' reads stdin), optionally watch it;
                                      a mergekit configuration (it has merge_method) is sent as application/yaml
    mudsc watch ID                    progress bar on stderr until the job is terminal
    mudsc download ID DIR             fetch the artifacts (sha256-checked)
    mudsc report ID [DIR]             fetch the merge report to look at (report.html, report.png; DIR default .)
    mudsc list [--status S] [--label k:v]
    mudsc cancel ID
    mudsc methods

The API URL and key come from ``--api-url``/``--api-key``, else ``MUDSC_API_URL``/``MUDSC_API_KEY``, else
the env file named by ``--env-file`` or ``MUDSC_ENV_FILE`` (the local stack writes one: ``.stack/env``). Exit status: 0 success, 1 job failed or canceled, 2 usage or API error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
import yaml

from mudsc_client.client import TERMINAL, ApiError, DownloadError, MudscClient

EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR = 0, 1, 2


def _load_spec(path: str) -> dict[str, Any]:
    return _parse_spec(path, sys.stdin.read() if path == "-" else Path(path).read_text())


def _parse_spec(path: str, text: str) -> dict[str, Any]:
    spec = yaml.safe_load(text)  # YAML is a superset of JSON
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a job spec must be a mapping, got {type(spec).__name__}")
    return spec


def is_mergekit_config(spec: dict[str, Any]) -> bool:
    """A mergekit configuration (it names ``merge_method``) rather than one of our job specs (``method``)."""
    return "merge_method" in spec


def submit_file(client: MudscClient, path: str, idempotency_key: str | None = None) -> dict[str, Any]:
    """Submit a job spec file; a mergekit configuration goes as it is, ``application/yaml`` (the API translates it)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    spec = _parse_spec(path, text)
    if not is_mergekit_config(spec):
        return client.submit(spec, idempotency_key=idempotency_key)
    headers = {"Content-Type": "application/yaml"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return client._request("POST", "/v1/merges", content=text.encode(), headers=headers).json()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


class ProgressBar:
    """One redrawn line on a terminal, one line per change otherwise (logs stay readable)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last = ""

    def update(self, status: str, progress: dict[str, Any] | None) -> None:
        progress = progress or {}
        percent = float(progress.get("percent") or 0.0)
        filled = int(self.width * min(max(percent, 0.0), 100.0) / 100.0)
        stage = progress.get("stage") or ""
        message = progress.get("message") or ""
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {percent:5.1f}% {status:<9} {stage} {message}".rstrip()
        if line == self._last:
            return
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(len(self._last[:200])))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line

    def close(self) -> None:
        if self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()


def watch(client: MudscClient, job_id: str, *, out: TextIO = sys.stderr) -> dict[str, Any]:
    """Follow the job's event stream with a progress bar; returns the terminal job."""
    job = client.get(job_id)
    bar = ProgressBar(out)
    status, progress = job["status"], job.get("progress")
    if status not in TERMINAL:
        # The stream replays the job's events from the first one, so the bar moves forward only.
        for event in client.stream(job_id):
            data = event.get("data") if isinstance(event.get("data"), dict) else {}
            if event.get("type") == "status":
                status = data.get("status", status)
            elif event.get("type") == "progress":
                progress = data
            elif event.get("type") == "log" and not bar.tty:
                out.write(f"  {data.get('message', data)}\n")
            bar.update(status, progress)
        job = client.get(job_id)
    bar.update(job["status"], job.get("progress"))
    bar.close()
    if job["status"] == "failed" and job.get("error"):
        error = job["error"]
        out.write(f"failed [{error.get('code')}] at {error.get('stage')}: {error.get('message')}\n")
    return job


def _job_exit(job: dict[str, Any]) -> int:
    return EXIT_OK if job["status"] == "succeeded" else EXIT_JOB_FAILED


def _cmd_submit(client: MudscClient, args: argparse.Namespace) -> int:
    job = submit_file(client, args.spec, idempotency_key=args.idempotency_key)
    print(f"submitted {job['id']} ({job['status']})", file=sys.stderr)
    if not args.wait:
        _print_json(job)
        return EXIT_OK
    job = watch(client, job["id"])
    _print_json(job)
    return _job_exit(job)


def _cmd_watch(client: MudscClient, args: argparse.Namespace) -> int:
    job = watch(client, args.job_id)
    _print_json(job)
    return _job_exit(job)


def _cmd_download(client: MudscClient, args: argparse.Namespace) -> int:
    for path in client.download(args.job_id, args.dest):
        print(path)
    return EXIT_OK


def _cmd_report(client: MudscClient, args: argparse.Namespace) -> int:
    for path in client.download_report(args.job_id, args.dest):
        print(path)
    return EXIT_OK


def _cmd_list(client: MudscClient, args: argparse.Namespace) -> int:
    page = client.list(status=args.status, label=args.label, limit=args.limit, after=args.after)
    if args.json:
        _print_json(page)
        return EXIT_OK
    for job in page["data"]:
        progress = job.get("progress") or {}
        print(
            f"{job['id']}  {job['status']:<10} {job['created_at']}  {job['spec']['method']['name']:<16} "
            f"{progress.get('stage') or ''} {progress.get('percent') or ''}".rstrip()
        )
    if page.get("has_more") and page["data"]:
        print(f"... more: mudsc list --after {page['data'][-1]['id']}", file=sys.stderr)
    return EXIT_OK


def _cmd_cancel(client: MudscClient, args: argparse.Namespace) -> int:
    _print_json(client.cancel(args.job_id))
    return EXIT_OK


def _cmd_methods(client: MudscClient, args: argparse.Namespace) -> int:
    methods = client.methods()
    if args.json:
        _print_json(methods)
        return EXIT_OK
    for method in methods:
        needs = [
            name
            for name, flag in (
                ("base model", method.get("requires_base_model")),
                ("architecture", method.get("requires_architecture")),
            )
            if flag
        ]
        needs.append(f"calibration {method.get('calibration', '?')}")
        print(f"{method['name']:<18} {method.get('family', ''):<12} {', '.join(needs)}")
        print(f"{'':<18} {method.get('description', '')}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mudsc", description="Client of the model-merging service.")
    parser.add_argument("--api-url", help="default: $MUDSC_API_URL, else the env file")
    parser.add_argument("--api-key", help="default: $MUDSC_API_KEY, else the env file")
    parser.add_argument(
        "--env-file", help="KEY=value file with MUDSC_API_URL/MUDSC_API_KEY, e.g. .stack/env (default: $MUDSC_ENV_FILE)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser(
        "submit", help="submit a job spec or a mergekit configuration (YAML or JSON file, '-' for stdin)"
    )
    submit.add_argument("spec")
    submit.add_argument("--wait", action="store_true", help="watch until the job is terminal")
    submit.add_argument("--idempotency-key")
    submit.set_defaults(run=_cmd_submit)

    watch_cmd = sub.add_parser("watch", help="show progress until the job is terminal")
    watch_cmd.add_argument("job_id")
    watch_cmd.set_defaults(run=_cmd_watch)

    download = sub.add_parser("download", help="download the artifacts of a succeeded job")
    download.add_argument("job_id")
    download.add_argument("dest")
    download.set_defaults(run=_cmd_download)

    report = sub.add_parser("report", help="download a succeeded job's merge report (report.html and report.png)")
    report.add_argument("job_id")
    report.add_argument("dest", nargs="?", default=".")
    report.set_defaults(run=_cmd_report)

    list_cmd = sub.add_parser("list", help="list your jobs, newest first")
    list_cmd.add_argument("--status")
    list_cmd.add_argument("--label", help="key:value")
    list_cmd.add_argument("--limit", type=int, default=20)
    list_cmd.add_argument("--after", help="job id to continue after")
    list_cmd.add_argument("--json", action="store_true")
    list_cmd.set_defaults(run=_cmd_list)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=_cmd_cancel)

    methods = sub.add_parser("methods", help="list the merge methods")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(run=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with MudscClient.from_env(args.env_file, api_url=args.api_url, api_key=args.api_key) as client:
            return int(args.run(client, args))
    except (ApiError, DownloadError, httpx.HTTPError, ValueError, OSError, yaml.YAMLError) as exc:
        print(f"mudsc: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
