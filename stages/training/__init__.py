"""Training: the epoch loop (loop) and its checkpoints, the linear probe (probe), the head on cached
features (heads), fine-tuning on images (finetuning) and its torchrun workers (distributed)."""
