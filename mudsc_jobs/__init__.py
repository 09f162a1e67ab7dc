"""The job layer shared by the API (``app``) and the worker (``worker``): settings, job store, storage, dispatch.

- ``settings``: the one ``Settings`` object (pydantic-settings, ``MUDSC_*`` environment variables);
- ``store``: the Redis job store (records, fenced Lua transitions, event streams, leases);
- ``storage``: boto3 clients and the one mapping of S3 errors to error codes;
- ``dispatch``: the Celery configuration and the send side of the merge task.
- ``webhooks`` / ``webhook_store``: signed webhooks (signatures, outbound policy) and their delivery records.

It imports no torch and no HTTP framework; the core's torch-free ``mudsc_core.schema`` and
``mudsc_core.errors`` are the only core modules it uses.
"""
