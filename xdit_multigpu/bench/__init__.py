"""GPU benchmarks (run on GPU machines): ``python -m xdit_multigpu.bench --help``."""
