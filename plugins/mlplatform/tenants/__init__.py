"""Tenant files -> Airflow pools (and, in mlplatform.k8s.manifests, Kubernetes quotas)."""
