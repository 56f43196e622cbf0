"""Image classification runner (paper Tables 1-2).

    python experiments/train_cifar.py model=resnet56 method=per method.lam=1e-4 data=cifar10 seed=0
    python experiments/train_cifar.py experiment=t1_cifar10_resnet56_per
"""
import sys

import hydra
from omegaconf import DictConfig

from experiments.common import check_command_line, run_main
from per.training.image_task import build_image_experiment


@hydra.main(config_path="../configs", config_name="train_cifar", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_main(cfg, build_image_experiment)


if __name__ == "__main__":
    check_command_line("train_cifar", sys.argv[1:])
    main()
