"""Build hook for the optional C counting kernel; all metadata lives in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the histograms count with torch ops
(slower on CPU, same counts). ``weibull_monitor.estimator.histogram.COUNTING_BACKEND`` says which one is in use.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weibull_monitor.estimator.histogram._codecount",
            sources=["weibull_monitor/estimator/histogram/_codecount.c"],
            extra_compile_args=["/O2"] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ]
)
