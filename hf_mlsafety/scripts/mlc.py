"""`hf-mlsafety mlc`: DPO + the Multi-Lingual Consistency loss, like `trl dpo`.

    hf-mlsafety mlc --model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name builtin --use_peft --load_in_4bit \
        --output_dir qwen-mlc --mlc_lambda 0.8
"""

from ..trainer.mlc_config import MLCConfig
from ._training import make_training_parser, run_training


def make_parser(prog=None):
    return make_training_parser(MLCConfig, prog=prog)


def main(script_args, training_args, model_args):
    from ..trainer.mlc_trainer import MLCTrainer

    return run_training(MLCTrainer, "mlc", script_args, training_args, model_args)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
