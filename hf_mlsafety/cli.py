"""The `hf-mlsafety` command: one subcommand per method plus `eval`, in the style of `trl dpo`."""

import importlib
import sys


# Subcommand -> (module under hf_mlsafety.scripts, one-line help).
SUBCOMMANDS = {
    "demo": ("demo", "The main job: English DPO vs DPO + MLC on the embedded SmolLM2, evaluated in ten languages."),
    "mlc": ("mlc", "DPO + Multi-Lingual Consistency loss (MLCTrainer), like `trl dpo`."),
    "mlc-sft": ("mlc_sft", "SFT + Multi-Lingual Consistency loss (MLCSFTTrainer), like `trl sft`."),
    "mpo": ("mpo", "Multilingual reward gaP Optimization (MPOTrainer), like `trl dpo`."),
    "msd": ("msd", "Multilingual Self-Distillation with DPSW (MSDTrainer), like `trl distillation`."),
    "edit": ("edit", "Training-free sparse weight editing (SparseSafetyEditor), saved as a LoRA adapter."),
    "eval": ("eval", "Per-language safety evaluation (attack success rate, refusal, invalid, over-refusal)."),
}


def _usage():
    lines = ["usage: hf-mlsafety <command> [<args>] [--config config.yaml]", "", "commands:"]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `hf-mlsafety <command> --help` for the arguments of a command."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"hf-mlsafety: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    script = importlib.import_module(f"hf_mlsafety.scripts.{SUBCOMMANDS[command][0]}")
    parser = script.make_parser(prog=f"hf-mlsafety {command}")
    arguments = parser.parse_args_and_config(args=rest)
    script.main(*arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
