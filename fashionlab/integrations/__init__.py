"""Integrations: fashionlab runs seen in other tools (MLflow, TensorBoard). Each lives in its
own module (MLflow: a subpackage), imported only when used (`pip install 'fashionlab[mlflow]'`
or `'fashionlab[tensorboard]'`), so that importing this package pulls in none of them."""
