"""Synthetic gradients let a small LSTM learn beyond its truncation: on Repeat Copy at T = 4,
DNI solves longer episodes than truncated BPTT on every seed (BUILD_NOTES.md has the margin,
measured on 6 seeds: BPTT 5 on all, DNI 7 to 9). BPTT is the control a broken DNI would equal:
zero synthetic gradients make DNI's core updates BPTT's."""

from __future__ import annotations

from sgjax.bench.rnn_table import RNN_PRESETS, cell_config, run_cell

SEEDS = [0, 1, 2]


def test_dni_solves_longer_repeat_copy_episodes_than_bptt_on_every_seed():
    preset = RNN_PRESETS["paper_rnn_quick"]  # LSTM 32, batch 16, 4-bit patterns, Adam 1e-3
    solved = {
        mode: run_cell(
            cell_config(preset, "repeat_copy", mode, 4, num_steps=20_000), SEEDS, count_flops=False
        ).solved
        for mode in ("bptt", "dni")
    }
    assert min(solved["dni"]) > max(solved["bptt"]), solved
