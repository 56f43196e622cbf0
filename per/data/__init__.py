"""Datasets: CIFAR-10/100 (python-pickle layout) and word-level corpora (PTB, WikiText-2)."""
