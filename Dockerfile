# syntax=docker/dockerfile:1
# The platform image: every Airflow component (api-server, scheduler, dag-processor, triggerer, Celery
# workers), the MLflow tracking server, the serving gateway and the `mlplatform` CLI.
#
#   docker compose build                                   # what docker-compose.yaml uses
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t mlplatform/platform:0.1.0 .
#
# The repo's layout is kept under /opt/airflow (= AIRFLOW_HOME) and the package is installed editable
# from there, so mlplatform.config.REPO_ROOT is /opt/airflow: the trainer (include/trainer/train.py), the
# tenant files, the templates and the specs are where the code's defaults expect them.
# The trainer pod of the kubernetes train backend has its own image: include/trainer/Dockerfile.
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.9
ARG AIRFLOW_UID=50000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    AIRFLOW_HOME=/opt/airflow \
    MLPLATFORM_HOME=/opt/mlplatform \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    GIT_PYTHON_REFRESH=quiet

# libgomp1: xgboost and scikit-learn's OpenMP runtime; tini: PID 1 that forwards signals (Celery warm shutdown).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /home/airflow --create-home --shell /bin/bash airflow

WORKDIR /opt/airflow

# The pinned lock first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install "uv==${UV_VERSION}" \
    && uv pip install --system --compile-bytecode -r requirements.txt

# The code, owned by root (read-only for the runtime user), in the repo's layout.
COPY pyproject.toml ./
COPY plugins/ plugins/
COPY dags/ dags/
COPY dag_templates/ dag_templates/
COPY include/ include/
RUN uv pip install --system --no-deps -e . \
    && pip uninstall -y uv \
    && python -m compileall -q plugins dags include \
    && mkdir -p /opt/airflow/logs /opt/mlplatform /opt/mlplatform-artifacts \
    && chown "${AIRFLOW_UID}:0" /opt/airflow /opt/airflow/logs /opt/mlplatform /opt/mlplatform-artifacts \
    && chmod 2775 /opt/airflow /opt/airflow/logs /opt/mlplatform /opt/mlplatform-artifacts \
    && mlplatform --help > /dev/null \
    && mlplatform dagfiles --check

# Recorded on every MLflow run and model version as mlplatform.git_commit.
ARG GIT_COMMIT=""
ENV MLPLATFORM_GIT_COMMIT=${GIT_COMMIT}

USER ${AIRFLOW_UID}
# api-server, MLflow, gateway, worker log server
EXPOSE 8080 5000 8000 8793
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["mlplatform", "--help"]
