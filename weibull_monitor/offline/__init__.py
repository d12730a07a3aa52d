"""Offline work on saved weights and stores: checkpoint ``sources`` (a registry of formats) -> ``checkpoints``
(files, indexes, model directories, series) -> ``scan`` (fits through the same snapshot builder as training) ->
``tables`` (what ``scan`` prints) and ``report`` (figures and a page from a run store)."""
