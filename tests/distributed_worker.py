"""Worker of `tests/test_distributed.py` (not a test module: pytest does not collect it).

Trains MLCTrainer, MPOTrainer and MSDTrainer in turn on the tiny model, two optimizer steps each, with the same global
batch whatever the number of processes (`--global_batch_size` split evenly over the processes). Run it under
`accelerate launch --num_processes 2 --cpu` (gloo DDP) or as a plain single process for the reference, e.g.

    python tests/distributed_worker.py --model_dir TINY --output_root OUT --results_dir RESULTS

Each process writes `RESULTS/rank<k>.json` (steps, log history, distributed setup, what it wrote while saving and
pushing) and `RESULTS/<method>_rank<k>.safetensors` (trainable weights before and after training).

Everything that could differ between one process and two is fixed: SGD (so that a wrong gradient scale, which Adam's
first step would hide, moves the weights differently), no gradient clipping in effect, sequential data order, greedy
MSD generation, LoRA initialised with non-zero A and B (the policy differs from its reference from step 1 on, so the
DPO/MPO/MSD losses and every LoRA gradient are non-trivial).
"""

import argparse
import json
import os
import sys


METHODS = ("mlc", "mpo", "msd")
LANGUAGES = ["en", "sw", "jv"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output_root", required=True, help="Trainer output folders (shared by every process).")
    parser.add_argument("--results_dir", required=True, help="Where each process writes its results.")
    parser.add_argument("--global_batch_size", type=int, default=4)
    parser.add_argument("--hub_prefix", default=None, help="Push each trained model to `<hub_prefix>-<method>`.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    return parser.parse_args(argv)


def tree(root):
    """Every file and folder under `root`: relative path → (size, mtime_ns) (folders: None)."""
    entries = {}
    for directory, folders, files in os.walk(root):
        for name in folders:
            entries[os.path.relpath(os.path.join(directory, name), root) + "/"] = None
        for name in files:
            stat = os.stat(os.path.join(directory, name))
            entries[os.path.relpath(os.path.join(directory, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return entries


def changed(before, after):
    return sorted(path for path, value in after.items() if path not in before or before[path] != value)


class WriteRecorder:
    """Records, through Python audit hooks, the files and folders this process opens for writing, creates, moves or
    deletes under `root`. Writes done in native code (safetensors, torch.save's zip writer) bypass audit hooks: the
    save/push check also compares the folder tree before and after."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.paths = []

    def _note(self, path):
        try:
            path = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if path == self.root or path.startswith(self.root + os.sep):
            self.paths.append(os.path.relpath(path, self.root))

    def __call__(self, event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & self.WRITE_FLAGS):
                self._note(path)
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
            self._note(args[0])
        elif event in ("os.rename", "shutil.copyfile", "shutil.move", "os.symlink", "os.link"):
            self._note(args[1])


def main(argv=None):
    options = parse_args(argv)
    recorder = WriteRecorder(options.output_root)
    sys.addaudithook(recorder)

    import torch

    torch.set_num_threads(1)  # tiny model on a shared 2-core machine: intra-op threads only add contention

    import torch.distributed as dist
    from accelerate import PartialState
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, set_seed

    from hf_mlsafety import MLCConfig, MLCTrainer, MPOConfig, MPOTrainer, MSDConfig, MSDTrainer
    from hf_mlsafety.data import load_builtin_dataset

    state = PartialState(cpu=True)  # MULTI_CPU (gloo) under a torchrun-style launch
    rank, world_size = state.process_index, state.num_processes
    if options.global_batch_size % world_size:
        raise ValueError(f"--global_batch_size {options.global_batch_size} does not split over {world_size} processes")
    tokenizer = AutoTokenizer.from_pretrained(options.model_dir)

    result = {
        "rank": rank,
        "world_size": world_size,
        "distributed_type": str(state.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "methods": {},
    }

    def common(method, **extra):
        settings = dict(
            output_dir=os.path.join(options.output_root, method, "run"),
            max_steps=2,
            per_device_train_batch_size=options.global_batch_size // world_size,
            gradient_accumulation_steps=1,
            optim="sgd",
            learning_rate=0.05,
            lr_scheduler_type="constant",
            max_grad_norm=1e9,  # the norm is computed and logged, but no clipping rescales the gradient
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        if options.hub_prefix:
            settings.update(hub_model_id=f"{options.hub_prefix}-{method}", hub_token=os.environ.get("HF_TOKEN"))
        settings.update(extra)
        return settings

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)

    def build(method):
        data = load_builtin_dataset(method, languages=LANGUAGES).select(range(2 * options.global_batch_size))
        if method == "mlc":
            args = MLCConfig(**common(method), max_length=256, train_sampling_strategy="sequential",
                             mlc_extractor_dim=16)
            return MLCTrainer(model=options.model_dir, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=lora())
        if method == "mpo":
            args = MPOConfig(**common(method), max_length=256, train_sampling_strategy="sequential")
            return MPOTrainer(model=options.model_dir, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=lora())
        args = MSDConfig(**common(method), max_completion_length=6, shuffle_dataset=False,
                         generation_kwargs={"do_sample": False})
        return MSDTrainer(model=options.model_dir, args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=lora())

    def trainable(trainer):
        model = trainer.accelerator.unwrap_model(trainer.model)
        weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        extractor = getattr(trainer, "mlc_extractor", None)
        if extractor is not None:
            weights.update({f"mlc_extractor.{n}": t.detach().clone() for n, t in extractor.state_dict().items()})
        return weights

    for method in options.methods:
        set_seed(0)  # the same initial LoRA and extractor weights in every run and on every process
        trainer = build(method)
        # A dropped row (prompt filling `max_length`) would leave a short last batch, which accelerate evens out across
        # processes by repeating rows: the global batches would then differ from one process's
        if len(trainer.train_dataset) != 2 * options.global_batch_size:
            raise RuntimeError(f"{method}: {len(trainer.train_dataset)} training rows left; raise `max_length`")
        initial = trainable(trainer)
        trainer.train()
        final = trainable(trainer)
        save_file(
            {**{f"initial/{k}": v for k, v in initial.items()}, **{f"final/{k}": v for k, v in final.items()}},
            os.path.join(options.results_dir, f"{method}_rank{rank}.safetensors"),
        )
        entry = {
            "global_step": trainer.state.global_step,
            "log_history": trainer.state.log_history,
            "accelerator_distributed_type": str(trainer.accelerator.distributed_type),
            "accelerator_num_processes": trainer.accelerator.num_processes,
            "model_wrapped": type(trainer.model_wrapped).__name__,
            "should_save": trainer.args.should_save,
            "is_world_process_zero": trainer.is_world_process_zero(),
        }

        # Save and push on every process, as a user script does, but one process at a time (non-main processes first,
        # the main process last) while the others wait at a barrier: what the folder tree gains during a process's
        # turn was written by that process.
        final_dir = os.path.join(options.output_root, method, "final")
        for turn in reversed(range(world_size)):
            state.wait_for_everyone()
            if rank == turn:
                before = tree(options.output_root)
                trainer.save_model(final_dir)
                if options.hub_prefix:
                    trainer.push_to_hub(commit_message=f"{method} distributed push")
                entry["written_by_save_and_push"] = changed(before, tree(options.output_root))
        state.wait_for_everyone()
        result["methods"][method] = entry
        del trainer

    result["audited_writes"] = sorted(set(recorder.paths))
    with open(os.path.join(options.results_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
