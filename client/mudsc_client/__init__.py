"""Python SDK and ``mudsc`` CLI of the mudsc merge service; needs only httpx and PyYAML (no server, no torch)."""

from mudsc_client.client import TERMINAL, ApiError, DownloadError, MudscClient, read_env_file

__all__ = ["TERMINAL", "ApiError", "DownloadError", "MudscClient", "read_env_file"]
