"""The merge service's HTTP API (FastAPI), its settings, the Redis job store and S3 helpers.

Nothing here imports torch: the API process runs on the torch-free ``mudsc_core.schema``.
"""
