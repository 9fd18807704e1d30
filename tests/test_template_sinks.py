"""Tenant text never becomes template source (issue 11, item 1: templated sinks).

Airflow renders an operator's or notifier's ``template_fields`` as Jinja with ``conn``, ``var`` and ``macros`` in
the context; the kubelet expands ``$(NAME)`` in container env values; PromQL label matchers are strings in a
query. The real notifier render with a ``{{ conn... }}`` payload is in tests/test_notify.py.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import mlplatform

PAYLOAD = "{{ conn.platform_db.password }}$(AWS_SECRET_ACCESS_KEY)\"} or vector(1) #"


def _classes():
    for info in pkgutil.walk_packages(mlplatform.__path__, "mlplatform."):
        if info.name.startswith(("mlplatform.ui", "mlplatform.serving.__main__")) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                yield cls


def test_no_operator_or_notifier_of_the_platform_has_template_fields():
    from airflow.sdk import BaseNotifier, BaseOperator

    from mlplatform.notify import plain_smtp_notifier_class

    found = [c for c in _classes() if issubclass(c, (BaseOperator, BaseNotifier))] + [plain_smtp_notifier_class()]
    assert len(found) >= 12, [c.__name__ for c in found]
    templated = {c.__qualname__: (tuple(c.template_fields), tuple(getattr(c, "template_ext", ())))
                 for c in found if tuple(c.template_fields) or tuple(getattr(c, "template_ext", ()))}
    assert templated == {}, "tenant text reaches these fields: pass it as a value, never as a template"


def test_pod_env_values_are_not_expanded_by_the_kubelet():
    from mlplatform.k8s.pod import _env

    env = {e["name"]: e.get("value") for e in _env({"MLPLATFORM_LABEL": PAYLOAD, "MLPLATFORM_FEATURES": "a,$(HOME)"},
                                                    "acme")}
    assert env["MLPLATFORM_LABEL"] == PAYLOAD.replace("$(", "$$(")  # the kubelet turns $$( back into $(
    assert env["MLPLATFORM_FEATURES"] == "a,$$(HOME)"
    secret_refs = [e for e in _env({}, "acme") if "valueFrom" in e]
    assert secret_refs, "the credentials still come as Secret references"


@pytest.mark.parametrize("value", ['v1"} or vector(1) #', "a\\", 'x\ny'])
def test_promql_label_values_stay_strings(value):
    from mlplatform.k8s.kserve import PROMQL, promql_label

    quoted = promql_label(value)
    query = PROMQL["requests"].format(ns="ml-acme", rev=quoted, w=60)
    inner = query.split('revision_name="', 1)[1]
    # The label value ends at the first unescaped quote: everything up to it is the escaped value.
    end = next(i for i, ch in enumerate(inner) if ch == '"' and (i == 0 or inner[i - 1] != "\\" or
                                                                 inner[:i].endswith("\\\\")))
    assert inner[:end] == quoted and inner[end:].startswith('"}[60s]'), query
