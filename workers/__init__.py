"""MergeForge workers: the merge engine (a plain library) and, later, the Celery tasks that run it."""
