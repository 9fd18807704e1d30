"""Kubernetes side of the platform: the trainer pod and per-tenant manifests as plain dicts.

``pod`` and ``manifests`` import only the standard library and ``mlplatform.spec`` (safe at DAG-parse
time); ``run`` is the only module that touches the cncf.kubernetes provider, inside its functions.
"""
