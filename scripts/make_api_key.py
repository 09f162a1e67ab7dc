"""Generate an API key for a tenant and the MUDSC_AUTH__API_KEYS entry that the server needs.

    python scripts/make_api_key.py TENANT [--prefix s3://models/ --prefix s3://data/]

The key is printed once (give it to the tenant); the server stores only its SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tenant")
    parser.add_argument(
        "--prefix",
        action="append",
        default=None,
        help="s3:// prefix the tenant may read and write (repeatable; default models/ and data/)",
    )
    args = parser.parse_args()
    key = f"mudsc_{args.tenant}_{secrets.token_urlsafe(24)}"
    entry = {
        "tenant": args.tenant,
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "allowed_prefixes": args.prefix or ["s3://models/", "s3://data/"],
    }
    print(f"API key (give it to {args.tenant}, it is not stored): {key}")
    print(f"MUDSC_AUTH__API_KEYS entry: {json.dumps(entry)}")


if __name__ == "__main__":
    main()
