"""`hf-mlsafety msd`: Multilingual Self-Distillation, like `trl distillation` (no teacher model needed).

    hf-mlsafety msd --model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name builtin --use_peft --load_in_4bit \
        --msd_mode on_policy --max_completion_length 256 --output_dir qwen-msd
"""

from ..trainer.msd_config import MSDConfig
from ._training import make_training_parser, run_training


def make_parser(prog=None):
    return make_training_parser(MSDConfig, prog=prog)


def main(script_args, training_args, model_args):
    from ..trainer.msd_trainer import MSDTrainer

    return run_training(MSDTrainer, "msd", script_args, training_args, model_args)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
