"""Metric names: the one vocabulary used by the trainer, the logs, MLflow and Tune."""

META_TRAIN_LOSS = "meta_train/loss"
META_TRAIN_ACC = "meta_train/acc"
META_TRAIN_TASKS_PER_S = "meta_train/tasks_per_s"
META_TRAIN_SKIPPED_STEPS = "meta_train/skipped_steps"
META_TRAIN_OVERHEAD = "meta_train/overhead"  # fraction of a step outside the slowest shard's compute
META_TRAIN_WORKER_FAULTS = "meta_train/worker_faults"  # shards re-run because their worker died
META_TRAIN_GRAD_NORM = "meta_train/grad_norm"
META_TRAIN_SHARDS = "meta_train/shards"  # shards the step's tasks were split into: its workers (scaling.max_workers)
# optim.hard_tasks > 0: the step's additional meta-step on hard tasks (Sun et al. 2019 Sec. 4.2), its tasks' means
META_TRAIN_HARD_LOSS = "meta_train/hard_loss"
META_TRAIN_HARD_ACC = "meta_train/hard_acc"
META_TRAIN_HARD_GRAD_NORM = "meta_train/hard_grad_norm"
META_TRAIN_HARD_CLASSES = "meta_train/hard_classes"  # distinct failure classes of the step's tasks (before top-up)
META_VAL_LOSS = "meta_val/loss"
META_VAL_ACC = "meta_val/acc"
META_TEST_LOSS = "meta_test/loss"
META_TEST_ACC = "meta_test/acc"
LAKE_ERROR_PCT = "lake/error_pct"  # percent of Lake's 20-way one-shot queries misclassified (mtl-ray eval --lake)
DEPLOY_VAL_ACC = "deploy/val_acc"  # a deployment-search trial's accuracy on the target's validation episodes
DEPLOY_TEST_ACC = "deploy/test_acc"  # the chosen settings' accuracy on fresh test episodes of the target
PRETRAIN_LOSS = "pretrain/loss"  # mean over the report window and across data-parallel workers
PRETRAIN_ACC = "pretrain/acc"
PRETRAIN_VAL_LOSS = "pretrain/val_loss"  # held-out examples of the pretraining classes
PRETRAIN_VAL_ACC = "pretrain/val_acc"
PRETRAIN_IMAGES_PER_S = "pretrain/images_per_s"
PRETRAIN_WORKERS = "pretrain/workers"  # data-parallel Ray Train workers in the group
PRETRAIN_LR = "pretrain/lr"  # the learning rate of the last step reported (pretrain.schedule, warmup_steps)


def prefixed(phase: str, sums: dict[str, float], num_tasks: int) -> dict[str, float]:
    """``{"loss": s}`` summed over ``num_tasks`` tasks -> ``{"<phase>/loss": s / num_tasks}``."""
    return {f"{phase}/{k}": v / max(num_tasks, 1) for k, v in sums.items()}
