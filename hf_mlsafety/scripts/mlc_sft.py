"""`hf-mlsafety mlc-sft`: SFT + the Multi-Lingual Consistency loss, like `trl sft`.

    hf-mlsafety mlc-sft --model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name builtin --use_peft --load_in_4bit \
        --output_dir qwen-mlc-sft --mlc_lambda 0.8
"""

from ..trainer.mlc_sft_config import MLCSFTConfig
from ._training import make_training_parser, run_training


def make_parser(prog=None):
    return make_training_parser(MLCSFTConfig, prog=prog)


def main(script_args, training_args, model_args):
    from ..trainer.mlc_sft_trainer import MLCSFTTrainer

    return run_training(MLCSFTTrainer, "mlc_sft", script_args, training_args, model_args)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
