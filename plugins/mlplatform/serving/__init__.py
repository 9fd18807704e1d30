"""Model serving: the embedded gateway that serves registered models over HTTP (champion + canary)."""
