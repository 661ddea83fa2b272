"""Automated search (Optuna): each trial varies one candidate of a study, is scored by its
cross-validation, and is pruned while it trains when it is clearly worse than the others.

    loop      run_search: claim trials and run them until a stopping rule holds (one worker's part)
    trial     one trial: its folds trained, reported to the pruner, counted and scored
    space     how a trial's drawn values become a candidate; the sampler (and a grid search's grid)
    storage   the search's Optuna study name, its storage on the store's database; the lock
    cost      budgets, and equal-compute pruning (what trials spend: fashionlab.trials)
    finish    the end of a search: the best retrained and tested, the table, plots, summary
    result    SearchResult: where a search stands (one line of text; a table in Jupyter)

    >>> import fashionlab as fl
    >>> from fashionlab.search import run_search
    >>> result = run_search(fl.load_study("search"), n_trials=20)
"""

from __future__ import annotations

from fashionlab.search.cost import EqualComputePruner
from fashionlab.search.finish import SearchContext, consensus_scores, finish_search
from fashionlab.search.loop import run_search
from fashionlab.search.result import SearchResult
from fashionlab.search.space import make_sampler
from fashionlab.search.storage import search_identity
from fashionlab.search.trial import make_pruner
from fashionlab.trials import Spent, fold_epochs, spent

__all__ = [
    "EqualComputePruner",
    "SearchContext",
    "SearchResult",
    "Spent",
    "consensus_scores",
    "finish_search",
    "fold_epochs",
    "make_pruner",
    "make_sampler",
    "run_search",
    "search_identity",
    "spent",
]
