"""MLCTrainer, MPOTrainer and MSDTrainer under DDP: two CPU processes (gloo) launched with `accelerate launch`,
checked against one process training on the same global batch.

One launch trains the three trainers in turn (`tests/distributed_worker.py`, two optimizer steps each, 2 processes x
2 examples); a plain single process runs the same worker with 1 x 4 examples. Both start at the same time and the
checks below read what each process wrote.

`accelerate launch --cpu --num_processes 2` does not start two processes: `--cpu` selects accelerate's simple
launcher (one process) unless an MPI hostfile is given. The launch here uses the torchrun-style launcher
(`--multi_gpu`) with `ACCELERATE_USE_CPU=true` and `use_cpu=True`, which gives `DistributedType.MULTI_CPU` over gloo on
any machine; test_both_processes_train_under_ddp checks that two processes really ran.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_mlsafety.testing_hub import FakeHub


WORKER = Path(__file__).with_name("distributed_worker.py")
METHODS = ("mlc", "mpo", "msd")
HUB_PREFIX = "org/ddp"
TIMEOUT = 300
# Wall-clock values: the only logged values allowed to differ between runs
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time"}
# Each method's own metrics (per step), which must be logged under DDP too
METHOD_METRICS = {
    "mlc": ["mlc/loss", "mlc/sigma1_share", "mlc/cosine_to_en", "mlc/cosine_to_en/sw", "mlc/cosine_to_en/jv"],
    "mpo": ["mpo/gap_loss", "mpo/retain_loss", "mpo/ref_reward_gap_dominant", "mpo/reward_gap_sw",
            "mpo/reward_gap_jv", "mpo/reward_gap_accuracy"],
    "msd": ["msd/kl", "msd/dpsw_teacher_weight", "msd/dpsw_student_weight", "msd/kl_sw", "msd/kl_jv",
            "msd/completion_length_sw", "msd/completion_length_jv"],
}
# Sums over the global batch (token counts): a metric not gathered, or gathered twice, is off by a factor of 2
COUNT_METRICS = {"mlc": ["num_tokens"], "mpo": [], "msd": ["num_tokens"]}
# Float32 sums in another order (2 x 2 rows instead of 4): values agree to ~1e-5 relative, updates to ~1e-4
RTOL = 1e-3
UPDATE_RTOL = 2e-3


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command, env, log_dir, name):
    stdout = open(log_dir / f"{name}.stdout", "w")
    stderr = open(log_dir / f"{name}.stderr", "w")
    process = subprocess.Popen(
        command, env=env, cwd=WORKER.parent.parent, stdout=stdout, stderr=stderr, start_new_session=True
    )
    return process, (stdout, stderr)


def finish(process, handles, log_dir, name):
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the workers it started (own session)
        process.wait()
    for handle in handles:
        handle.flush()
    if process.returncode != 0:
        stderr = (log_dir / f"{name}.stderr").read_text(errors="replace")
        stdout = (log_dir / f"{name}.stdout").read_text(errors="replace")
        pytest.fail(
            f"{name} run failed (exit code {process.returncode}; -9 = killed after {TIMEOUT} s)\n"
            f"--- stderr (tail) ---\n{stderr[-8000:]}\n--- stdout (tail) ---\n{stdout[-2000:]}",
            pytrace=False,
        )


def tree_files(root):
    return sorted(
        os.path.relpath(os.path.join(directory, name), root) for directory, _, names in os.walk(root) for name in names
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    for folder in ("ddp_out", "ddp_results", "single_out", "single_results", "logs"):
        (root / folder).mkdir()
    hub = FakeHub(root=str(root / "hub")).start()

    base_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    # The DDP run pushes to a loopback fake Hub of its own (offline mode lifted for that process only)
    ddp_env = {
        **base_env,
        "ACCELERATE_USE_CPU": "true",
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": os.environ.get("HF_TOKEN", "hf_fake_token_for_tests_0123456789"),
    }
    single_env = {**base_env, "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        ddp_env.pop(key, None)
        single_env.pop(key, None)

    worker_args = ["--model_dir", str(tiny_model_dir), "--global_batch_size", "4"]
    ddp_command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(WORKER), *worker_args,
        "--output_root", str(root / "ddp_out"), "--results_dir", str(root / "ddp_results"), "--hub_prefix", HUB_PREFIX,
    ]  # fmt: skip
    single_command = [
        sys.executable, str(WORKER), *worker_args,
        "--output_root", str(root / "single_out"), "--results_dir", str(root / "single_results"),
    ]  # fmt: skip
    logs, started = root / "logs", {}
    try:
        # Both at once: the single process mostly runs while the two DDP processes wait on each other
        started["ddp"] = start(ddp_command, ddp_env, logs, "ddp")
        started["single"] = start(single_command, single_env, logs, "single")
        for name in ("single", "ddp"):
            finish(*started[name], logs, name)
    finally:
        for process, handles in started.values():
            if process.poll() is None:  # only after a failure: end what this fixture started
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for handle in handles:
                handle.close()
        hub.stop()

    def results(folder, ranks):
        return {
            rank: {
                "json": json.loads((root / folder / f"rank{rank}.json").read_text()),
                "weights": {m: load_file(str(root / folder / f"{m}_rank{rank}.safetensors")) for m in METHODS},
            }
            for rank in ranks
        }

    assert sorted(os.listdir(root / "ddp_results")) == sorted(
        [f"rank{k}.json" for k in (0, 1)] + [f"{m}_rank{k}.safetensors" for m in METHODS for k in (0, 1)]
    ), "the DDP launch did not run two processes to the end"
    return {
        "root": root,
        "ddp": results("ddp_results", (0, 1)),
        "single": results("single_results", (0,))[0],
        "commits": list(hub.commits),
        "hub_files": {m: hub.list_files(hub.repo_folder("model", f"{HUB_PREFIX}-{m}")) for m in METHODS},
        "hub_folder": {m: Path(hub.repo_folder("model", f"{HUB_PREFIX}-{m}")) for m in METHODS},
    }


def step_logs(result, method):
    return [log for log in result["json"]["methods"][method]["log_history"] if "loss" in log]


def summary_log(result, method):
    return [log for log in result["json"]["methods"][method]["log_history"] if "train_loss" in log]


def trained(weights):
    """`name: (initial, final)` for every trainable tensor (LoRA, and the MLC extractor)."""
    names = [key[len("final/") :] for key in weights if key.startswith("final/")]
    return {name: (weights[f"initial/{name}"], weights[f"final/{name}"]) for name in names}


def test_both_processes_train_under_ddp(runs):
    for rank in (0, 1):
        result = runs["ddp"][rank]["json"]
        assert (result["rank"], result["world_size"]) == (rank, 2)
        assert result["distributed_type"] == "DistributedType.MULTI_CPU" and result["backend"] == "gloo"
        for method in METHODS:
            entry = result["methods"][method]
            assert entry["global_step"] == 2, (rank, method)
            assert entry["accelerator_distributed_type"] == "DistributedType.MULTI_CPU"
            assert entry["accelerator_num_processes"] == 2
            assert entry["model_wrapped"] == "DistributedDataParallel"  # gradients synchronised by DDP
            assert entry["should_save"] == entry["is_world_process_zero"] == (rank == 0)
            assert [log["step"] for log in step_logs(runs["ddp"][rank], method)] == [1, 2]
    single = runs["single"]["json"]
    assert (single["world_size"], single["distributed_type"]) == (1, "DistributedType.NO")
    for method in METHODS:
        assert single["methods"][method]["global_step"] == 2
        assert single["methods"][method]["model_wrapped"] != "DistributedDataParallel"


@pytest.mark.parametrize("method", METHODS)
def test_losses_and_weights_match_one_process_on_the_same_global_batch(runs, method):
    ddp_logs, single_logs = step_logs(runs["ddp"][0], method), step_logs(runs["single"], method)
    for ddp_log, single_log in zip(ddp_logs, single_logs, strict=True):
        # The logged loss is the mean over both processes' halves of the batch: the one-process loss of that batch
        assert ddp_log["loss"] == pytest.approx(single_log["loss"], rel=RTOL), (method, ddp_log["step"])
        assert ddp_log["grad_norm"] == pytest.approx(single_log["grad_norm"], rel=RTOL)  # the all-reduced gradient
    assert ddp_logs[0]["loss"] != pytest.approx(ddp_logs[1]["loss"], rel=RTOL)  # the two steps saw different data
    assert summary_log(runs["ddp"][0], method)[0]["train_loss"] == pytest.approx(
        summary_log(runs["single"], method)[0]["train_loss"], rel=RTOL
    )

    # Same seed: the same initial LoRA (and extractor) weights. With SGD and no clipping, an update is lr x the
    # gradient, so it is the averaged gradient of the global batch only if DDP (and, for the extractor, which lives
    # outside the DDP module, MLCExtractorCallback) averages the gradients of the two halves: a sum or a rank-local
    # gradient would be off by a factor of about 2.
    ddp, single = trained(runs["ddp"][0]["weights"][method]), trained(runs["single"]["weights"][method])
    assert ddp.keys() == single.keys()
    assert any("lora_A" in name for name in ddp) and any("lora_B" in name for name in ddp)
    if method == "mlc":
        assert {"mlc_extractor.projection.weight", "mlc_extractor.projection.bias"} <= ddp.keys()
    for name, (initial, final) in ddp.items():
        single_initial, single_final = single[name]
        assert torch.equal(initial, single_initial), name
        update, single_update = final - initial, single_final - single_initial
        assert (update - single_update).norm() <= UPDATE_RTOL * single_update.norm(), (
            f"{name}: update differs from one process by {(update - single_update).norm() / single_update.norm():.2e}"
        )
        torch.testing.assert_close(final, single_final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_weights_are_identical_on_both_processes_and_trained(runs, method):
    rank0, rank1 = (trained(runs["ddp"][rank]["weights"][method]) for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name, (initial, final) in rank0.items():
        assert torch.equal(initial, rank1[name][0]), f"{name}: initial weights differ across processes"
        assert torch.equal(final, rank1[name][1]), f"{name}: trained weights differ across processes"
        assert not torch.equal(initial, final), f"{name} did not change"


@pytest.mark.parametrize("method", METHODS)
def test_metrics_are_gathered_once(runs, method):
    rank0, rank1, single = (step_logs(run, method) for run in (*runs["ddp"].values(), runs["single"]))
    assert len(rank0) == len(single) == 2  # one log entry per step
    for log0, log1, single_log in zip(rank0, rank1, single, strict=True):
        assert set(METHOD_METRICS[method]) <= log0.keys()
        assert log0.keys() == log1.keys() == single_log.keys()
        for key in log0.keys() - TIMING_KEYS:
            # Gathered: every process logs the global value, not the one of its own half of the batch ...
            assert log0[key] == log1[key], (method, key)
            # ... and the global value is the one-process value
            assert log0[key] == pytest.approx(single_log[key], rel=RTOL, abs=1e-6), (method, key)
        for key in COUNT_METRICS[method]:
            assert log0[key] == single_log[key], (method, key)  # exact: counts gathered exactly once
        for key in METHOD_METRICS[method]:
            assert math.isfinite(log0[key])
    if method == "mpo":  # the per-language gaps need the gathered `target_language` list of every process
        assert {"mpo/reward_gap_sw", "mpo/reward_gap_jv"} <= rank0[0].keys()


@pytest.mark.parametrize("method", METHODS)
def test_only_the_main_process_writes(runs, method):
    rank0, rank1 = (runs["ddp"][rank]["json"] for rank in (0, 1))
    # save_model + push_to_hub were called on both processes, one at a time (rank 1 first): rank 1's turn left the
    # output folders unchanged, rank 0's wrote the saved model once
    assert rank1["methods"][method]["written_by_save_and_push"] == []
    written = rank0["methods"][method]["written_by_save_and_push"]
    expected = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_args.bin", "README.md"}
    if method == "mlc":
        expected |= {"mlc_extractor.safetensors", "mlc_extractor_config.json"}
    assert {f"{method}/final/{name}" for name in expected} <= set(written)
    assert {f"{method}/run/{name}" for name in expected - {"training_args.bin"}} <= set(written)  # push_to_hub's save
    # Over the whole run, rank 1 opened nothing for writing under the output folders (Python-level writes)
    assert rank1["audited_writes"] == []
    # One set of files: the saved folder holds what one process saves, nothing per rank
    ddp_final = tree_files(runs["root"] / "ddp_out" / method / "final")
    assert ddp_final == tree_files(runs["root"] / "single_out" / method / "final")
    assert not any("rank" in name for name in tree_files(runs["root"] / "ddp_out"))


@pytest.mark.parametrize("method", METHODS)
def test_only_the_main_process_pushes(runs, method):
    repo_id = f"{HUB_PREFIX}-{method}"
    commits = [commit for commit in runs["commits"] if commit["repo_id"] == repo_id]
    assert len(commits) == 1, commits  # push_to_hub called on both processes: one commit
    assert commits[0]["summary"] == f"{method} distributed push"
    files = set(runs["hub_files"][method])
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert ("mlc_extractor.safetensors" in files) == (method == "mlc")
    pushed = runs["hub_folder"][method] / "adapter_model.safetensors"
    saved = runs["root"] / "ddp_out" / method / "final" / "adapter_model.safetensors"
    assert pushed.read_bytes() == saved.read_bytes()  # the trained adapter, as saved by the main process
