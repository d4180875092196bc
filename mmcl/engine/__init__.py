"""The training engine: the task DeepSpeed wraps, optimizer and schedule, checkpoints, the loop."""
