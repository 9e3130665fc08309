"""Train the paper's CNN with backprop (bp), synthetic gradients (sg) or cDNI (cdni).

The same flags and outputs as experiments/mnist_mlp.py, plus --filters and --kernel_size;
--hidden_layers counts the convolutional stages (the paper's depth is that plus the classifier).
Defaults are the paper's (64 filters of 5x5 on MNIST, 128 on CIFAR-10). A quick run on the CPU:

  python experiments/mnist_cnn.py --mode=cdni --num_steps=1000 --eval_every=500 \
      --filters=16 --learning_rate=1e-3 --batch_size=64

CIFAR-10: --dataset=cifar10 with the python-version archive under --data_dir (see the README).
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.cli.errors import make_flags_parser
from sgjax.cli.train import define_script_flags, script_main

MODEL = "cnn"
define_script_flags(flags.FLAGS, MODEL)
FLAGS = flags.FLAGS
main = script_main(FLAGS, MODEL)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))
