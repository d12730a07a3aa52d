"""Runnable demonstrations, not library code: toy models and the embedded corpus (``toy``), ``weibull-monitor demo``
(``demo``), and the scaling study (``study``). The CLI runs them; nothing else in the package imports them."""
