"""The training driver: configs, data, models, the DDP loop, wandb logging and run comparison."""
