"""Training tasks: what a task reads from the token store, the batches it builds, its loss and
how it turns a prompt into model input. pipeline/registry.py lists them."""
