"""Recurrent DNI (Jaderberg et al. 2016, section 3.2): an LSTM trained with truncated BPTT
(--mode=bptt), with synthetic gradients at every segment boundary (dni), or with the auxiliary
prediction of future synthetic gradients too (dni_aux).

  python experiments/rnn.py --task=copy --mode=dni --truncation=3
  python experiments/rnn.py --task=repeat_copy --mode=dni_aux --truncation=3
  python experiments/rnn.py --task=char_lm --text_file=ptb.char.train.txt \
      --valid_file=ptb.char.valid.txt --test_file=ptb.char.test.txt --hidden_units=1024
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.cli.errors import make_flags_parser
from sgjax.cli.rnn import define_rnn_flags, rnn_main

define_rnn_flags(flags.FLAGS)
FLAGS = flags.FLAGS
main = rnn_main(FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))
