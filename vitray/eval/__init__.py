"""Evaluation of trained models: exact top-1 (in the training loop), few-shot ridge and linear probes (`linear`)."""
