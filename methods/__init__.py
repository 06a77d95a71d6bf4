"""Method plug-ins: one file per method, found by the registry in lorsbench.method (installed as lorsbench.methods)."""
