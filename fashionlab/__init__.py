"""fashionlab: rigorous, fast deep-learning experiments on Fashion-MNIST.

    >>> import fashionlab as fl
    >>> spec = fl.load_study("seed")            # or a path to your own study file
    >>> result = fl.run_study(spec)             # resumes an interrupted run of the same study
    >>> result.best, result.retrain.test_accuracy

Names load on first use (PEP 562), so that `import fashionlab` and the command line start
without importing torch, matplotlib or Optuna until a command needs them.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

from fashionlab.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CLASS_NAMES": "data",
    "Candidate": "config",
    "ConfigError": "errors",
    "ConvLayer": "config",
    "CVSpec": "config",
    "DataError": "errors",
    "DataSpec": "config",
    "DenseLayer": "config",
    "EarlyStopping": "config",
    "Evaluation": "evaluate",
    "FashionlabError": "errors",
    "ModelSpec": "config",
    "SavedModel": "artifacts",
    "Store": "store",
    "StoreError": "errors",
    "StudyResult": "results",
    "StudySpec": "config",
    "TrainSpec": "config",
    "WarningRule": "config",
    "bundled_studies": "config",
    "compare_to_best": "stats",
    "corrected_resampled_ttest": "stats",
    "evaluate": "evaluate",
    "export_model": "export",
    "export_onnx": "export",
    "holm": "stats",
    "load_fashion_mnist": "data",
    "load_idx_dataset": "data",
    "load_images": "predict",
    "load_model": "artifacts",
    "load_study": "config",
    "make_folds": "cv",
    "overfitting_warning": "cv",
    "predict": "predict",
    "predict_files": "predict",
    "quick_variant": "config",
    "run_study": "study",
    "save_model": "artifacts",
    "study_from_dict": "config",
    "study_to_toml": "config",
    "summarize": "stats",
    "write_report": "report",
}

__all__ = [
    "CLASS_NAMES",
    "CVSpec",
    "Candidate",
    "ConfigError",
    "ConvLayer",
    "DataError",
    "DataSpec",
    "DenseLayer",
    "EarlyStopping",
    "Evaluation",
    "FashionlabError",
    "ModelSpec",
    "SavedModel",
    "Store",
    "StoreError",
    "StudyResult",
    "StudySpec",
    "TrainSpec",
    "WarningRule",
    "bundled_studies",
    "compare_to_best",
    "corrected_resampled_ttest",
    "evaluate",
    "export_model",
    "export_onnx",
    "holm",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_images",
    "load_model",
    "load_study",
    "make_folds",
    "overfitting_warning",
    "predict",
    "predict_files",
    "quick_variant",
    "run_study",
    "save_model",
    "study_from_dict",
    "study_to_toml",
    "summarize",
    "write_report",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """`fashionlab.evaluate` and `fashionlab.predict` are functions named like the modules
    that define them. Importing such a module binds it on the package (Python does that for
    every submodule), which would hide the function: keep the function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# Optuna imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns "IProgress not
# found. Please update jupyter and ipywidgets" as it is imported: advice about tqdm's widgets,
# which fashionlab never draws (its progress is one line per epoch there). So in such a kernel
# tqdm.auto is imported here first, that warning ignored.
if "ipykernel" in sys.modules and "tqdm.autonotebook" not in sys.modules \
        and importlib.util.find_spec("ipywidgets") is None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto  # noqa: F401 - imported for its warning, above


if TYPE_CHECKING:  # static analysers and IDEs see the names directly
    from fashionlab.artifacts import SavedModel, load_model, save_model
    from fashionlab.config import (
        Candidate,
        ConvLayer,
        CVSpec,
        DataSpec,
        DenseLayer,
        EarlyStopping,
        ModelSpec,
        StudySpec,
        TrainSpec,
        WarningRule,
        bundled_studies,
        load_study,
        quick_variant,
        study_from_dict,
        study_to_toml,
    )
    from fashionlab.cv import make_folds, overfitting_warning
    from fashionlab.data import CLASS_NAMES, load_fashion_mnist, load_idx_dataset
    from fashionlab.errors import ConfigError, DataError, FashionlabError, StoreError
    from fashionlab.evaluate import Evaluation, evaluate
    from fashionlab.export import export_model, export_onnx
    from fashionlab.predict import load_images, predict, predict_files
    from fashionlab.report import write_report
    from fashionlab.results import StudyResult
    from fashionlab.stats import compare_to_best, corrected_resampled_ttest, holm, summarize
    from fashionlab.store import Store
    from fashionlab.study import run_study
