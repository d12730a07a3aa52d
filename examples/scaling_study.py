"""The scaling study: one small model, several AdamW settings (η, λ_wd), each trained from several seeds with the
monitor attached.

    python examples/scaling_study.py                 # the documented run: 5 settings x 3 seeds, a few minutes on a CPU
    python examples/scaling_study.py --quick         # the CI run: 4 settings x 3 seeds, about a minute of CPU
    python examples/scaling_study.py --arch neox     # GPT-NeoX with a fused query_key_value
    python examples/scaling_study.py --setting 5e-3:1 --setting 2e-2:0.25 --seeds 0,1 --out my-study
    ATEN_CPU_CAPABILITY=avx2 python examples/scaling_study.py --quick --threads 2   # another CPU's kernels

Every setting trains from each seed until T/τ = Σ η_t·λ_wd reaches the target, with a snapshot of every weight
matrix at least 30 times on the way, into one run store (<out>/study.sqlite, one run per setting and seed). Then
the store is read back: the terminal Transmission scale λ against √(η/λ_wd) (Pearson r and the fitted slope, for
all runs pooled and for each seed, with the spread over the seeds), λ/λ_first and λ/√(η/λ_wd) against T/τ for
every run, and the class-median k against T/τ beside the Gaussian anchor and the paper's bands
(<out>/study_*.png), with a summary table. See docs/study.md for what it measured, on which CPU kernels.
"""

from __future__ import annotations

import sys

from weibull_monitor.demos.study import main

if __name__ == "__main__":
    sys.exit(main())
