"""Kaggle image-competition pipeline: folds, timm fine-tuning, tuning, ensembles, submissions."""

__version__ = "0.1.0"
