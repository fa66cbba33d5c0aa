"""The reference decoder and its trainer: model, presets, optimizer, LR schedules, data, training loop, hyperparameter lint."""
