"""Integrations: send fashionlab runs to other tools. Each lives in its own module, imported
only when used (`fashionlab.integrations.mlflow` needs `pip install 'fashionlab[mlflow]'`), so
that importing this package pulls in none of them."""
