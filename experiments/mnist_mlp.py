"""Train the paper's MLP with backprop (bp), synthetic gradients (sg) or cDNI (cdni).

Defaults are the paper's MNIST settings. The README's quick example (under a minute on a 2-core
CPU):

  python experiments/mnist_mlp.py --mode=sg --num_steps=3000 --eval_every=1000 \
      --sg_hidden_layers=1 --sg_hidden_units=256 --learning_rate=1e-3

The paper's CIFAR-10 FCN: --dataset=cifar10 --hidden_units=1000 --sg_hidden_layers=1
--sg_hidden_units=4000 (CIFAR-10 under --data_dir; see the README).
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.cli.errors import make_flags_parser
from sgjax.cli.train import define_script_flags, script_main

MODEL = "mlp"
define_script_flags(flags.FLAGS, MODEL)
FLAGS = flags.FLAGS
main = script_main(FLAGS, MODEL)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))
