# The worker image: the merge engine with CUDA torch (runs on CPU when no GPU is visible).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
# torch comes with the base image; the engine extra's loose pin keeps it.
RUN pip install '.[worker]' && useradd --uid 10001 --create-home mergeforge
USER mergeforge
ENV MERGEFORGE_CACHE_DIR=/cache MERGEFORGE_WORK_DIR=/work
CMD ["celery", "-A", "workers.celery_app:celery_app", "worker", "-Q", "cpu", "--concurrency", "1", "--loglevel", "info"]
