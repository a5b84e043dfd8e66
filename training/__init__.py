"""The training engine that train_triplet.py and train_center.py share.

One module per concern; imports flow from the scripts down into this package, never back:

- `cli`: the flags both scripts accept, the demo defaults, the cheap checks of files and values.
- `runtime`: device, torchrun process group, mixed precision, seeding, logging, collectives.
- `builders`: the model, optimizer and learning-rate schedule from the flags.
- `data`: the training CSV, distributed samplers, the DataLoader.
- `checkpoint`: what a checkpoint holds, writing it, reading it back for a resume; the output folder.
- `records`: per-epoch history, the CSV log and the loss / accuracy plots.
- `validation`: the per-epoch LFW validation.
- `engine`: the task API (`TrainingTask`, `StepOutput`), the `Trainer` loop and `run_training`.
"""
