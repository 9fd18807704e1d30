"""Stage logic, one module per stage, free of Airflow so each runs and tests on its own.

Operators (``mlplatform.operators``) are thin: they build a ``RunContext`` and call these functions
inside ``execute()``. Each function imports its ML library lazily and returns a JSON-able dict (the XCom).
"""
