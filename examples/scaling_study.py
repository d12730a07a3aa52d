"""The scaling study: one small model, one seed, several AdamW settings (η, λ_wd), the monitor attached to each.

    python examples/scaling_study.py                 # the documented run: 5 settings, a few minutes on a CPU
    python examples/scaling_study.py --quick         # the CI run: 4 settings, well under a minute
    python examples/scaling_study.py --arch neox     # GPT-NeoX with a fused query_key_value
    python examples/scaling_study.py --setting 4e-3:2.5 --setting 1.6e-2:0.625 --out my-study

Every setting trains from the same seed until T/τ = Σ η_t·λ_wd reaches the target, with a snapshot of every weight
matrix at least 30 times on the way, into one run store (<out>/study.sqlite, one run per setting). Then the store
is read back: the terminal Transmission scale λ against √(η/λ_wd) (Pearson r and the fitted slope), λ/λ_first and
λ/√(η/λ_wd) against T/τ for every run, and the class-median k against T/τ beside the Gaussian anchor and the
paper's bands (<out>/study_*.png), with a summary table. See docs/study.md for what it measured.
"""

from __future__ import annotations

import sys

from weibull_monitor.demos.study import main

if __name__ == "__main__":
    sys.exit(main())
