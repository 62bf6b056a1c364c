"""The trainer: mesh + logical axis rules, checkpoints, the training loop, multi-process start-up."""
