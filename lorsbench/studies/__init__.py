"""Study drivers: the measurements behind choices the harness ships (the offline suite, the pruning table).

They use the library; nothing in the library imports them. Run them through `lorsbench select-suite` and
`lorsbench measure-pruning` (or `python -m lorsbench.studies.<module>`)."""
