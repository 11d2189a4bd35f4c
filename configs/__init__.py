"""Shipped run recipes (YAML) and the default DeepSpeed config, found through importlib.resources."""
