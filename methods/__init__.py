"""Method plug-ins: one file per method, found by the registry in lorsbench.registry (installed as lorsbench.methods)."""
