"""Thin training CLIs over the model core: prepare data, train, evaluate, predict."""
