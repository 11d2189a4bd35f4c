"""Training: setup (model, engine, data, tracker, resume), the step and the loop, checkpoints,
elastic resume, the DeepSpeed config and engine, the optimizer and its schedule."""
