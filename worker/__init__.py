"""Celery worker: consumes the ``gpu`` queue and runs merges (``worker.celery_app:app``)."""
