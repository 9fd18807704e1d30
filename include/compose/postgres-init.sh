#!/bin/sh
# Runs once, when the PostgreSQL data volume is empty (docker-entrypoint-initdb.d), as POSTGRES_USER.
# POSTGRES_DB (airflow) already exists: the Airflow metadata database.
# Mounted read-only by docker-compose.yaml; changing it later needs `docker compose down -v` (drops all data).
set -eu

# The password goes in as a psql variable (:'pw' quotes it as a literal), never spliced into the SQL text.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="$PREDICTIONS_DB_PASSWORD" <<'SQL'
-- MLflow tracking server backend store (experiments, runs, model registry).
CREATE DATABASE mlflow;

-- Prediction log of the serving gateway, owned by a role of its own: the gateway writes it and the monitors'
-- workers read it without POSTGRES_PASSWORD, which opens the Airflow metadata database.
CREATE ROLE predictions LOGIN PASSWORD :'pw';
CREATE DATABASE predictions OWNER predictions;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
