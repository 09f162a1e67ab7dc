"""A webhook receiver for the integration tests: a real HTTP server process that verifies every delivery's
signature with an independent implementation (the ``standardwebhooks`` package) and logs what it got.

    python -m tests.integration.webhook_receiver --port PORT --secret whsec_... --log FILE

Each request appends one JSON line to FILE when it arrives (``"phase": "received"``, with the webhook id, whether
the signature verified, the event type and the job) and one when it is answered (``"phase": "answered"``). The
path picks the answer: ``/ok/...`` 204, ``/gone/...`` 410, ``/fail/...`` 500, ``/hang-once/...`` hangs (60 s,
without answering) the first time that path is called, 204 afterwards.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

_LOCK = threading.Lock()
_SEEN: set[str] = set()


def make_handler(secret: str, log: Path) -> type[BaseHTTPRequestHandler]:
    verifier = Webhook(secret)

    def record(entry: dict[str, Any]) -> None:
        with _LOCK, open(log, "a") as out:
            out.write(json.dumps(entry) + "\n")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_POST(self) -> None:  # noqa: N802 - the base class's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            entry: dict[str, Any] = {
                "phase": "received",
                "path": self.path,
                "time": time.time(),
                "webhook_id": self.headers.get("webhook-id"),
                "signatures": len((self.headers.get("webhook-signature") or "").split()),
                "host": self.headers.get("host"),
            }
            try:
                payload = verifier.verify(body, dict(self.headers.items()))
                entry.update(verified=True, type=payload["type"], job_id=payload["data"]["id"])
                entry.update(status=payload["data"]["status"], timestamp=payload["timestamp"])
            except (WebhookVerificationError, ValueError, KeyError) as exc:
                entry.update(verified=False, error=str(exc))
            record(entry)
            kind = self.path.strip("/").split("/")[0]
            if kind == "hang-once":
                with _LOCK:
                    first = self.path not in _SEEN
                    _SEEN.add(self.path)
                if first:
                    time.sleep(60)
                    return
            code = {"gone": 410, "fail": 500}.get(kind, 204)
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()
            record({"phase": "answered", "path": self.path, "webhook_id": entry["webhook_id"], "code": code})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.secret, args.log))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
