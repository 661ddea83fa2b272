"""Connections to other tools: TensorBoard event files of a run (`tensorboard`)."""
