"""Data location: partitions of a tenant's source, and the deterministic example data sets."""
