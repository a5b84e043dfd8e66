"""The training engine that train_triplet.py, train_center.py and train_margin.py share.

One module per concern; imports flow from the scripts down into this package, never back:

- `cli`: the flags the scripts share, the demo defaults, the cheap checks of files and values.
- `runtime`: device, torchrun process group, mixed precision, seeding, logging, collectives.
- `builders`: the model, optimizer and learning-rate schedule from the flags.
- `data`: the training CSV, distributed samplers, the DataLoader.
- `checkpoint`: what a checkpoint holds, writing it, reading it back for a resume; the output folder.
- `records`: per-epoch history, the CSV log and the loss / accuracy plots.
- `validation`: the per-epoch LFW validation.
- `engine`: the task API (`TrainingTask`), the `Trainer` loop and `run_training`.
- `step`: one optimisation step (`StepOutput`, the loss DDP sees, backward and the optimizers' steps).
- `run_folder`: the run's folder and run_config.json; the checkpoint `--resume_path auto` continues from.
- `coordination`, `finetune`: stop requests and failures across processes; `--init_from`.
"""
