"""Scale-out on Redis: roles ``collector`` and ``edge`` (docs/cluster.md)."""
