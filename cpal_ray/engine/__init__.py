"""Single-process training and evaluation (plain PyTorch, no Ray)."""
from cpal_ray.engine.checkpoint import context_from_state, load_checkpoint, load_trained, save_checkpoint
from cpal_ray.engine.local import build_bank, cluster_context, fit_local, warmup_hook
from cpal_ray.engine.loop import Context, evaluate_seeds, push_prototypes, train_one_epoch
from cpal_ray.engine.optim import build_optimizer, poly_scheduler, steps_per_epoch, total_steps

__all__ = ["Context", "build_bank", "build_optimizer", "cluster_context", "context_from_state", "evaluate_seeds",
           "fit_local", "load_checkpoint", "load_trained", "poly_scheduler", "push_prototypes", "save_checkpoint",
           "steps_per_epoch", "total_steps", "train_one_epoch", "warmup_hook"]
