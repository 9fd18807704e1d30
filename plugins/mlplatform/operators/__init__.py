"""One operator per stage. Each is thin: it builds a RunContext and calls ``mlplatform.stages`` inside
``execute()``, so DAG parsing never imports an ML library."""
