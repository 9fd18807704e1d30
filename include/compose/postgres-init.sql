-- Runs once, when the PostgreSQL data volume is empty (docker-entrypoint-initdb.d), as POSTGRES_USER.
-- POSTGRES_DB (airflow) already exists: the Airflow metadata database and the Celery result backend.
-- Mounted read-only by docker-compose.yaml; changing it later needs `docker compose down -v` (drops all data).

-- MLflow tracking server backend store (experiments, runs, model registry).
CREATE DATABASE mlflow;

-- Prediction log of the serving gateway.
CREATE DATABASE predictions;
