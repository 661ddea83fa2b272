"""fashionlab: rigorous, fast deep-learning experiments on Fashion-MNIST.

    >>> import fashionlab as fl
    >>> spec = fl.load_study("seed")            # or a path to your own study file
    >>> result = fl.run_study(spec)             # resumes an interrupted run of the same study
    >>> result.best, result.retrain.test_accuracy
"""

from __future__ import annotations

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
from fashionlab.export import export_onnx
from fashionlab.predict import load_images, predict, predict_files
from fashionlab.report import write_report
from fashionlab.stats import compare_to_best, corrected_resampled_ttest, holm, summarize
from fashionlab.store import Store
from fashionlab.study import StudyResult, run_study

__version__ = "0.1.0"

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
    "export_onnx",
    "holm",
    "load_fashion_mnist",
    "load_images",
    "load_idx_dataset",
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
