"""Training throughput and peak memory: gangen's real fit loop against the classic DCGAN loop, same run.

    python bench/throughput.py                                  # CPU, 64x64, batch 64, 3 paired repeats
    python bench/throughput.py --device cuda --batch_size 128 1024 --variants gangen gangen_compile
    python bench/throughput.py --eval_samples 256               # add a FID/KID/IS evaluation-time row
    python bench/throughput.py --root FOLDER --variants gangen gangen_pil   # an RGB image folder (CelebA-like)

Every measurement runs in its own subprocess (fresh peak memory, no shared warm caches): the baseline is
bench/classic_dcgan.py (PIL transforms in 2 DataLoader workers, fp32, Adam, BCE, .item() per step); gangen
is a Lightning `Trainer.fit` of gangen.system.GAN on gangen.data.ImageDataModule through gangen's CLI
classes (demo config at --resolution, width 64 like the baseline, no logger / checkpoints / validation),
timed from batch `--warmup` to the last batch by a callback. Repeats alternate the order of the runs.
Table: median images/s over repeats with the min-max spread, the median of the paired ratios to the
baseline (same repeat), and peak memory (CPU: peak RSS of the process plus the peak private memory of its
DataLoader workers, sampled every second, so the pages they share with it count once; GPU:
torch.cuda.max_memory_allocated).

--root: Fashion-MNIST's IDX files (default), or a folder of RGB images (subfolders = classes, as CelebA in
the example's ImageFolder): the baseline then reads it with torchvision's ImageFolder and gangen trains
`--data.dataset image_folder` at 3 channels, with `--workers` DataLoader workers too; the notes give the
seconds gangen's setup took (one-time decoding into its cache, in a fresh cache folder per run).

Variants (gangen's options on top of its defaults: bf16-mixed on CUDA and on CPUs with native bf16, channels_last,
fused Adam, cudnn.benchmark and the step as CUDA graphs on one CUDA GPU, on_device auto):
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VARIANTS: dict[str, list[str]] = {
    "gangen": [],  # the defaults
    "gangen_loader": ["--data.on_device", "false"],  # DataLoader over the in-memory uint8 set
    "gangen_on_device": ["--data.on_device", "true"],  # batches built where the model runs
    "gangen_fp32": ["--trainer.precision", "32-true"],
    "gangen_bf16": ["--trainer.precision", "bf16-mixed"],
    "gangen_nhwc": ["--model.channels_last", "true"],
    "gangen_nchw": ["--model.channels_last", "false"],
    "gangen_compile": ["--model.compile", "true"],
    "gangen_compile_ro": ["--model.compile", "reduce-overhead"],  # torch.compile with CUDA graphs per network
    "gangen_eager": ["--model.cuda_graph", "false"],  # no CUDA graphs (the default graphs the step where it can)
    "gangen_graph": ["--model.cuda_graph", "true"],  # the whole D+G step as CUDA graphs, or an error
    "gangen_graph_fp32": ["--model.cuda_graph", "true", "--trainer.precision", "32-true"],
    "gangen_graph_nchw": ["--model.cuda_graph", "true", "--model.channels_last", "false"],
    "gangen_pil": ["--data.cache", "false"],  # an image folder (--root) decoded per item, in --workers workers
}
EXPERIMENT_VARIANTS: dict[str, tuple[list[str], list[str]]] = {  # (overrides, bench/experiments.py patches)
    "exp_gemm_image": ([], ["gemm_image"]),
    "exp_bn_act": ([], ["bn_act"]),
    "exp_both": ([], ["gemm_image", "bn_act"]),
    "exp_gemm_image_eager": (["--model.cuda_graph", "false"], ["gemm_image"]),
    "exp_bn_act_eager": (["--model.cuda_graph", "false"], ["bn_act"]),
    "exp_nchw_image_strides": ([], ["nchw_image_strides"]),  # gangen before layers.nhwc_strides
}
__doc__ += "".join(f"    {k}: {' '.join(v) or '(defaults)'}\n" for k, v in VARIANTS.items())
__doc__ += "".join(
    f"    {k}: {' '.join(v) or '(defaults)'} + bench/experiments.py {' + '.join(e)}\n"
    for k, (v, e) in EXPERIMENT_VARIANTS.items()
)


def variant(name: str) -> tuple[list[str], list[str]]:
    """A variant's CLI overrides and its bench/experiments.py patches."""
    return EXPERIMENT_VARIANTS.get(name) or (VARIANTS[name], [])


class PeakMemory:
    """Peak RSS of this process plus the peak private memory of its child processes (DataLoader workers),
    the children sampled every `interval` s from /proc. A forked worker's RSS is mostly copy-on-write pages
    shared with its parent: adding it to the parent's peak RSS (as before) counted them twice, which made a
    2-worker baseline look ~400 MiB larger than it is."""

    def __init__(self, interval: float = 1.0) -> None:  # a sample reads ~10 ms of smaps per worker
        self.interval, self.children_kib = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _private_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
        except OSError:  # the process just exited
            return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == pid:
                    found.append(int(entry))
        return found

    def sample(self) -> None:
        total = sum(self._private_kib(child) for child in self._children(os.getpid()))
        self.children_kib = max(self.children_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> float:
        """The peak in MiB."""
        self._stop.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return (own + self.children_kib) / 1024


MEMORY: PeakMemory | None = None  # started by a --child process (CPU)


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if MEMORY is None:  # imported by another script (profile_step.py): the process's own peak RSS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return MEMORY.stop()


def run_baseline(args: argparse.Namespace) -> dict[str, float]:
    sys.path.insert(0, str(BENCH))
    from classic_dcgan import train

    result = train(
        args.root, args.batch, args.steps, args.warmup, args.workers, args.device, width=64, nz=100
    )  # the DataLoader iterator and its workers are gone when train() returns
    return {**result, "peak_mib": peak_memory_mib(args.device)}


def run_gangen(
    args: argparse.Namespace, overrides: list[str], callbacks: tuple = (), experiments: list[str] | None = None
) -> dict[str, float]:
    import lightning.pytorch as L

    from gangen.cli import GANCLI
    from gangen.data import ImageDataModule
    from gangen.system import GAN

    class Timer(L.Callback):
        start = end = replay_img_s = 0.0
        images = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                sync(args.device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx >= args.warmup:
                self.images += batch[0].shape[0]
            if batch_idx == args.warmup + args.steps - 1:
                sync(args.device)
                self.end = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            graphs = getattr(pl_module, "_step_graphs", None)  # the GPU-side ceiling: one captured step alone
            if graphs is not None and len(graphs):  # (before fit's teardown moves the model off the GPU)
                graph = next(iter(graphs._graphs.values())).graph
                sync(args.device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    graph.replay()
                sync(args.device)
                self.replay_img_s = args.batch * args.steps / (time.perf_counter() - start)

    r, n = args.resolution, args.warmup + args.steps
    folder = not (args.root / "train-images-idx3-ubyte.gz").is_file()
    data = ["--data.dataset", "image_folder", "--data.channels", "3", "--model.generator.init_args.channels", "3",
            "--model.discriminator.init_args.channels", "3", "--data.num_workers", str(args.workers)
            ] if folder else []  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GANGEN_CACHE_DIR"] = tmp  # a decoded folder is built afresh by every run (timed below)
        cli = GANCLI(
            GAN, ImageDataModule, run=False, auto_configure_optimizers=False,
            args=["--config", str(ROOT / "configs" / "dcgan_fashion_mnist.yaml"), "--trainer.logger", "false",
                  "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
                  "--trainer.callbacks", "[]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(n),
                  "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.default_root_dir",
                  tmp, "--data.root", str(args.root), "--data.resolution", str(r), "--data.batch_size",
                  str(args.batch), "--model.generator.init_args.resolution", str(r),
                  "--model.discriminator.init_args.resolution", str(r),
                  "--model.generator.init_args.base_channels", "64",
                  "--model.discriminator.init_args.base_channels", "64", *data, *overrides],
        )  # fmt: skip
        if experiments:
            from experiments import apply

            apply(cli.model, experiments)
        timer = Timer()
        cli.trainer.callbacks.extend([timer, *callbacks])
        start = time.perf_counter()
        cli.datamodule.prepare_data()  # (fit calls it again: then the cache is there)
        cli.datamodule.setup("fit")
        setup_s = time.perf_counter() - start
        cli.trainer.fit(cli.model, cli.datamodule)
    seconds = timer.end - timer.start
    loader = type(cli.trainer.train_dataloader).__name__
    result = {"img_s": timer.images / seconds, "seconds": seconds, "peak_mib": peak_memory_mib(args.device),
              "precision": str(cli.trainer.precision), "loader": loader, "setup_s": setup_s}  # fmt: skip
    if timer.replay_img_s:
        result["replay_img_s"] = timer.replay_img_s
    return result


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one FID + KID + IS evaluation of `eval_samples` images with cached real statistics."""
    sys.path.insert(0, str(BENCH))
    from eval_speed import image_sets, run_gangen

    from gangen import inception

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or inception.write_random_inception_weights(Path(tmp) / "random-inception.pth")
        real, fake = image_sets(args.eval_samples)
        ns = argparse.Namespace(device=args.device, batch_size=64)
        run_gangen(real, fake, weights, Path(tmp) / "cache", ns)  # fills the real-statistics cache
        _, times = run_gangen(real, fake, weights, Path(tmp) / "cache", ns)
    return {"seconds": sum(times.values()), "peak_mib": peak_memory_mib(args.device)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(args: argparse.Namespace, name: str, batch: int) -> dict | None:
    """Run one measurement in a fresh Python process; its JSON result, or None (and its error) if it failed."""
    cmd = [sys.executable, __file__, "--child", name, "--batch_size", str(batch)]
    for key in ("device", "resolution", "steps", "warmup", "workers", "root", "eval_samples", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    cmd += ["--weights", str(args.weights)] if args.weights else []
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {name} stopped after --child_timeout {args.child_timeout:g} s", flush=True)
        return None
    if out.returncode != 0:
        print(f"  {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace) -> None:
    names = ["baseline", *args.variants]
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else os.cpu_count()} "
          f"{'' if args.device == 'cuda' else 'CPUs'}), torch {torch.__version__}, {args.resolution}x"
          f"{args.resolution}, {args.steps} timed steps after {args.warmup}, {args.repeats} repeats, "
          f"baseline workers {args.workers}", flush=True)  # fmt: skip
    for batch in args.batch_size:
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]  # alternate: drift hits both sides equally
            for name in order:
                result = child(args, name, batch)
                if result is not None:  # a failed variant is reported and left out, the table goes on
                    runs[name].append({**result, "rep": rep})
                    print(f"  bs{batch} rep{rep} {name}: {result['img_s']:.1f} img/s", flush=True)
        base = {r["rep"]: r["img_s"] for r in runs["baseline"]}
        width = max(18, *map(len, names))
        print(f"\nbatch {batch}\n{'run':<{width}} {'img/s median':>12} {'min-max':>17} {'x baseline':>10} "
              f"{'ratio min-max':>14} {'peak MiB':>9}  notes")  # fmt: skip
        for name in names:
            if not runs[name]:
                print(f"{name:<{width}} {'failed':>12}")
                continue
            speeds = [r["img_s"] for r in runs[name]]
            ratios = [r["img_s"] / base[r["rep"]] for r in runs[name] if r["rep"] in base] or [float("nan")]  # paired
            notes = f"{runs[name][0].get('precision', '32')}, {runs[name][0].get('loader', 'DataLoader+PIL')}"
            if "setup_s" in runs[name][0]:
                notes += f", setup {statistics.median(r['setup_s'] for r in runs[name]):.1f} s"
            if "replay_img_s" in runs[name][0]:
                notes += f", graph replay alone {statistics.median(r['replay_img_s'] for r in runs[name]):.0f} img/s"
            print(f"{name:<{width}} {statistics.median(speeds):12.1f} {min(speeds):8.1f}-{max(speeds):<8.1f} "
                  f"{statistics.median(ratios):10.2f} {min(ratios):6.2f}-{max(ratios):<7.2f} "
                  f"{max(r['peak_mib'] for r in runs[name]):9.0f}  {notes}")  # fmt: skip
    if args.eval_samples:
        result = child(args, "eval", args.batch_size[0])
        if result is None:
            return
        print(f"\nFID+KID+IS evaluation, {args.eval_samples} generated images, real statistics cached: "
              f"{result['seconds']:.1f} s ({args.eval_samples / result['seconds']:.1f} img/s; "
              f"bench/eval_speed.py has the full comparison with torch-fidelity)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    p.add_argument("--variants", nargs="*", default=["gangen"], choices=[*VARIANTS, *EXPERIMENT_VARIANTS])
    p.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--eval_samples", type=int, default=0, help="also time a FID evaluation of N images (0: no)")
    p.add_argument("--weights", type=Path, default=None, help="Inception weights (default: a random file)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every run (0: torch's default)")
    p.add_argument("--child_timeout", type=float, default=900, help="seconds one measurement may take")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.resolution != 64:  # classic_dcgan.py's networks are the example's, built for 64x64 only
        p.error(f"--resolution {args.resolution}: the classic baseline is the 64x64 DCGAN example; use 64")
    if args.child is None:
        return table(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    global MEMORY
    if args.device == "cpu":
        MEMORY = PeakMemory()
    args.batch = args.batch_size[0]
    if args.child == "baseline":
        result = run_baseline(args)
    elif args.child == "eval":
        result = run_eval(args)
    else:
        overrides, experiments = variant(args.child)
        result = run_gangen(args, overrides, experiments=experiments)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
