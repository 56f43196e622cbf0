"""The Hydra entry points (`train_cifar.py`, `train_lm.py`) and their glue (`common.py`).

Installed with the project so that scripts and tests import `experiments.common`;
`per/` never imports Hydra.
"""
