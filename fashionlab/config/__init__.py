"""Study configuration: frozen dataclasses, read from and written to TOML.

A study file states a whole experiment declaratively: the data, the cross-validation protocol,
the overfitting warning, the candidate models, the retrain-and-test step, the models trained on
all data (the CNN of the seed study), and optionally a search space. Validation happens when a
file is read, once, with errors that name the file and the field:

    seed.toml: candidates[2].layers[0].dropout: must be < 1 (got 1.0)

    specs     the dataclasses and their validators (torch-free shape arithmetic included)
    files     reading, writing and shortening study files; the bundled studies
"""

from __future__ import annotations

from fashionlab.config.files import (
    bundled_studies,
    check_spec,
    derived,
    load_study,
    quick_variant,
    study_from_dict,
    study_source,
    study_to_toml,
)
from fashionlab.config.specs import (
    IMAGE_SIZE,
    MAX_PARAMETERS,
    N_CLASSES,
    SEED_RANGE,
    WILCOXON_P_THRESHOLD,
    Augment,
    Candidate,
    ConvLayer,
    CVSpec,
    DataSpec,
    DenseLayer,
    EarlyStopping,
    ModelSpec,
    ParamSpec,
    ReferenceSpec,
    RetrainSpec,
    SearchSpec,
    StudySpec,
    TrainSpec,
    WarningRule,
    base_candidate,
    conv_sides,
    toml_value,
)

__all__ = [
    "IMAGE_SIZE",
    "MAX_PARAMETERS",
    "N_CLASSES",
    "SEED_RANGE",
    "WILCOXON_P_THRESHOLD",
    "Augment",
    "CVSpec",
    "Candidate",
    "ConvLayer",
    "DataSpec",
    "DenseLayer",
    "EarlyStopping",
    "ModelSpec",
    "ParamSpec",
    "ReferenceSpec",
    "RetrainSpec",
    "SearchSpec",
    "StudySpec",
    "TrainSpec",
    "WarningRule",
    "base_candidate",
    "bundled_studies",
    "check_spec",
    "conv_sides",
    "derived",
    "load_study",
    "quick_variant",
    "study_from_dict",
    "study_source",
    "study_to_toml",
    "toml_value",
]
