"""Language-model runner (paper Table 3).

    python experiments/train_lm.py model=vd_lstm method=per method.lam=1e-4 data=ptb seed=0
    python experiments/train_lm.py experiment=t3_ptb_vd_lstm_per
"""
import sys

import hydra
from omegaconf import DictConfig

from experiments.common import check_command_line, run_main
from per.training.lm_task import build_lm_experiment


@hydra.main(config_path="../configs", config_name="train_lm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_main(cfg, build_lm_experiment)


if __name__ == "__main__":
    check_command_line("train_lm", sys.argv[1:])
    main()
