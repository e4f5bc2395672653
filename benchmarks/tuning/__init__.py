"""One-off kernel tuning harnesses, GPU only: ``python -m benchmarks.tuning.<script> --help``
from the repository root. What they measured is summarised in docs/kernels.md."""
