"""The platform page in the Airflow UI (served by the api-server through the AirflowPlugin in
:mod:`mlplatform.plugin`). Nothing here is imported when plugins load: :mod:`mlplatform.ui.lazy` builds the
FastAPI app on the first request."""
