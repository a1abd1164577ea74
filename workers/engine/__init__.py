"""The merge engine: a plain library with a CLI, no Celery and no HTTP inside.

Importing this package, `spec`, `errors`, `safetensors_format` or `methods` never imports torch, so the API can
validate merge specs with the same models the engine runs.
"""

__version__ = "0.1.0"
