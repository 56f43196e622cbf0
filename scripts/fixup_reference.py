"""The Fixup reference training loop (hongyi-zhang/Fixup `cifar/cifar_train.py`;
docs/protocols.md, Table 1), written out plainly, to run side by side with our image runner on the same files:
torchvision's CIFAR-10 reader, RandomCrop(32, padding=4) + flip + Normalize(Fixup's
constants), a shuffled DataLoader of 128 (last partial batch kept), SGD momentum 0.9 at
lr 0.1 with biases and scales at lr/10, weight decay 1e-4 on all, cross-entropy, no mixup;
the model is our Fixup ResNet (the reference architecture). Prints the training loss and
error over the epoch and the final test error, as our runner's epoch line does.

    python scripts/fixup_reference.py --root data --model resnet20 --seed 0
    python experiments/train_cifar.py experiment=t1_cifar10_resnet56_vanilla model=resnet20 \\
        trainer.epochs=1 seed=0           # ours, same data and epoch
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.datasets.cifar as tv_cifar
import torchvision.transforms as T

from per import models
from per.data.cifar import CIFAR_MEAN, CIFAR_STD


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder holding cifar-10-batches-py/")
    ap.add_argument("--model", default="resnet20", choices=models.list_models("cifar"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1, choices=range(1, 101), metavar="1..100",
                    help="epochs (lr 0.1 throughout: Fixup first divides it after epoch 100)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
    ap.add_argument("--verify-md5", action="store_true",
                    help="check the official archive's md5s (off: converted or generated copies)")
    args = ap.parse_args(argv)
    if not args.verify_md5:
        tv_cifar.check_integrity = lambda *a, **k: True
    torch.manual_seed(args.seed)
    normalize = T.Normalize(CIFAR_MEAN["cifar10"], CIFAR_STD["cifar10"])
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    train = tv_cifar.CIFAR10(args.root, train=True, transform=augment)
    test = tv_cifar.CIFAR10(args.root, train=False, transform=T.Compose([T.ToTensor(), normalize]))
    model = models.create(args.model, norm="none")
    scalars = [p for n, p in model.named_parameters() if "bias" in n or "scale" in n]
    others = [p for n, p in model.named_parameters() if not ("bias" in n or "scale" in n)]
    opt = torch.optim.SGD([{"params": scalars, "lr": 0.01}, {"params": others}], lr=0.1, momentum=0.9,
                          weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        loss_sum, wrong, seen = 0.0, 0, 0
        for x, y in loader:
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            wrong += (out.argmax(1) != y).sum().item()
            seen += len(y)
            step += 1
            if step == args.max_steps:
                break
        model.eval()
        with torch.no_grad():
            test_wrong = sum((model(x).argmax(1) != y).sum().item()
                             for x, y in torch.utils.data.DataLoader(test, batch_size=1000))
        print(f"reference epoch {epoch + 1} step {step} | train_loss={loss_sum / seen:.4g} "
              f"train_error={100 * wrong / seen:.4g} test_error={100 * test_wrong / len(test):.4g} "
              f"| wall {time.time() - t0:.0f} s", flush=True)
        if step == args.max_steps:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
