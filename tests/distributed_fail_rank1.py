"""`torchrun ... tests/distributed_fail_rank1.py <overrides>`: `python -m lorsbench` whose rank 1 raises in fine_tune
(tests/test_distributed.py: a failure on one rank fails the run and every rank exits)."""
import os
import runpy

if os.environ.get("RANK") == "1":
    import lorsbench.pipeline as pipeline

    def fine_tune(run):
        raise RuntimeError("planted failure on rank 1")

    pipeline.PHASES = tuple(fine_tune if phase is pipeline.fine_tune else phase for phase in pipeline.PHASES)

runpy.run_module("lorsbench", run_name="__main__", alter_sys=True)
