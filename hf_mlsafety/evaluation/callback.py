"""A `transformers.TrainerCallback` that measures per-language attack success rate during training."""

from transformers import TrainerCallback

from ..data import validate_probes
from .evaluator import SafetyEvaluator


class SafetyEvalCallback(TrainerCallback):
    """Every `eval_steps` optimizer steps, generates answers to a small multilingual harmful set, judges them and logs
    `safety/asr_<lang>`, `safety/asr_non_english`, `safety/asr_low` (and the other tier means) through the trainer's
    `log()`, so TensorBoard, W&B and `trainer.state.log_history` all receive them.

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer to evaluate and log through.
        harmful ([`~datasets.Dataset`]):
            Harmful prompts in the probe format (`prompt`, `language`, `parallel_id`, `label`); keep it small.
        eval_steps (`int`, *optional*, defaults to `50`):
            Evaluate every this many optimizer steps (and not at step 0).
        evaluator_kwargs:
            Passed to [`SafetyEvaluator`] (`judge`, `max_new_tokens`, `batch_size`, ...).

    Example:

    ```python
    >>> trainer = MLCTrainer(...)
    >>> probes = load_builtin_dataset("probes", split="dev").filter(lambda row: row["label"] == "harmful")
    >>> trainer.add_callback(SafetyEvalCallback(trainer, probes, eval_steps=20, max_new_tokens=48))
    ```
    """

    def __init__(self, trainer, harmful, eval_steps=50, **evaluator_kwargs):
        if eval_steps < 1:
            raise ValueError(f"`eval_steps` must be at least 1, got {eval_steps}.")
        if len(harmful) == 0:
            raise ValueError("The harmful prompt set of SafetyEvalCallback is empty.")
        validate_probes(harmful)
        self.trainer = trainer
        self.harmful = harmful
        self.eval_steps = eval_steps
        self.evaluator_kwargs = {"show_progress": False, **evaluator_kwargs}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 0 or state.global_step % self.eval_steps != 0:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        evaluator = SafetyEvaluator(model, self.trainer.processing_class, **self.evaluator_kwargs)
        summary = evaluator.evaluate(self.harmful)
        metrics = {f"safety/asr_{code}": summary.asr(code) for code in summary.languages}
        metrics.update(
            {f"safety/{key}": value for key, value in summary.summary().items() if key.startswith("asr_") and value is not None}
        )
        if state.is_world_process_zero:
            self.trainer.log(metrics)
