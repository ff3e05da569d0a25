"""`hf-mlsafety mpo`: Multilingual reward gaP Optimization, like `trl dpo`.

    hf-mlsafety mpo --model_name_or_path meta-llama/Llama-3.1-8B-Instruct --dataset_name builtin --use_peft \
        --load_in_4bit --beta 1.0 --precompute_ref_log_probs --output_dir llama-mpo
"""

from ..trainer.mpo_config import MPOConfig
from ._training import make_training_parser, run_training


def make_parser(prog=None):
    return make_training_parser(MPOConfig, prog=prog)


def main(script_args, training_args, model_args):
    from ..trainer.mpo_trainer import MPOTrainer

    return run_training(MPOTrainer, "mpo", script_args, training_args, model_args)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
