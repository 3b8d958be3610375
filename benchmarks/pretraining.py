"""Self-supervised pre-training for segmentation (paper Table 1): none / SimCLR / MoCo v3 / sorting.

For each seed: pre-train a ResNet-18 with each method on an unlabelled synthetic fish batch
(``tomoloc.pretrain.pretrain``, every method at the same batch size of slices), then
fine-tune DeepLabV3+ (``tomoloc.segmentation.finetune``) from each encoder and from a
random one on 1 % and 100 % of the labelled slices of the training volumes, and measure
IoU on held-out volumes. Each pre-training runs in a child process. Peak memory comes
from a separate short run per method (10 steps at the same batch size, also a child
process): the peak resident set size of the process (``VmHWM``, which, unlike
``ru_maxrss``, is not inherited from the parent) minus its RSS just before training:
weights, optimiser state, activations and data together. On GPU, torch's
``max_memory_allocated`` is reported instead.

Writes ``results.json`` (every run) into ``--out`` and the table into BENCHMARKS.md
("Pre-training for segmentation", or "... (large)" with ``--large``).

    python benchmarks/pretraining.py                # CPU size, about 40 minutes on 2 cores
    python benchmarks/pretraining.py --large        # GPU size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import update_section  # noqa: E402

METHODS = ("sorting", "simclr", "mocov3")
ROWS = (("none", "none (random init)"), ("simclr", "SimCLR"), ("mocov3", "MoCo v3"), ("sorting", "sorting loss"))
CLASSES = (3, 4)  # fish eyes ("visual system") and organs; skeleton is too thin at this size (see README)

SIZES = {
    "cpu": dict(n=12, n_test=4, shape=(48, 64, 64), input_size=64, batch=32, pre_epochs=3, pre_steps=40,
                ft_epochs=6, ft_steps=20, ft_batch=8, devices="cpu", precision="32-true"),
    "large": dict(n=48, n_test=8, shape=(96, 128, 128), input_size=128, batch=128, pre_epochs=20, pre_steps=100,
                  ft_epochs=20, ft_steps=50, ft_batch=16, devices="gpu", precision="bf16-mixed"),
}


def _status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args_json: str) -> None:
    """Pre-train one method (run in a fresh process); print one JSON line of measurements."""
    import lightning as L
    import torch

    from tomoloc.pretrain import pretrain
    from tomoloc.training import TrainConfig, quiet_lightning

    a = json.loads(args_json)
    quiet_lightning()
    torch.set_num_threads(a["threads"])
    # Everything training imports lazily is imported before the baseline RSS is read.
    import lightly.loss  # noqa: F401
    import lightly.models.modules.heads  # noqa: F401
    import lightning.pytorch.callbacks  # noqa: F401
    import lightning.pytorch.loggers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torchvision.transforms.v2  # noqa: F401

    import tomoloc.io  # noqa: F401

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
            self.starts.append(time.perf_counter())

    cfg = TrainConfig(task=a["method"], backbone="resnet18", input_size=a["input_size"], batch_size=a["batch"],
                      epochs=a["epochs"], steps_per_epoch=a["steps"], val_samples=2 * a["batch"], seed=a["seed"],
                      devices=a["devices"], precision=a["precision"])
    timer = StepTimer()
    rss0 = _status_mib("VmRSS")
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    pretrain(a["volumes"], a["out"], cfg, overwrite=True, callbacks=[timer])
    wall = time.perf_counter() - t0
    # Intervals between consecutive step starts (data + step), first steps of each epoch dropped:
    # the median leaves out the validation pause at each epoch's end.
    iv = np.diff(timer.starts)
    res = {"method": a["method"], "seed": a["seed"], "s_per_step": float(np.median(iv[2:])) if len(iv) > 2 else None,
           "wall_s": wall, "peak_rss_delta_mib": _status_mib("VmHWM") - rss0,
           "load_1min": [load0, os.getloadavg()[0]], "steps": len(timer.starts)}
    if torch.cuda.is_available() and a["devices"] != "cpu":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res), flush=True)


def _fmt(vals: list[float]) -> str:
    v = np.array([x for x in vals if x is not None], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _run_child(method: str, seed: int, vols: list[str], run_dir: Path, size: dict, epochs: int, steps: int,
               threads: int, env: dict) -> dict:
    a = {"method": method, "seed": seed, "volumes": vols, "out": str(run_dir), "input_size": size["input_size"],
         "batch": size["batch"], "epochs": epochs, "steps": steps, "devices": size["devices"],
         "precision": size["precision"], "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(a)], env=env, capture_output=True,
                          text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"pre-training {method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="GPU size (more volumes, larger input, longer runs).")
    ap.add_argument("--seeds", type=int, default=3, help="Seeds (each: pre-training and fine-tuning).")
    ap.add_argument("--out", type=Path, default=Path("bench_pretraining"), help="Work folder.")
    ap.add_argument("--no-write", action="store_true", help="Do not update BENCHMARKS.md.")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1: on a CPU shared with other jobs, two threads per "
                         "process oversubscribe the cores and every step slows down several-fold).")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_tiny", action="store_true", help=argparse.SUPPRESS)  # a few steps, to check the script
    args = ap.parse_args()
    if args._child:
        child(args._child)
        return

    from tomoloc.segmentation import SegConfig, finetune
    from tomoloc.synth import LABELS, write_batch
    from tomoloc.training import quiet_lightning

    import torch

    quiet_lightning()
    torch.set_num_threads(args.threads)
    size = SIZES["large" if args.large else "cpu"]
    if args._tiny:
        size = {**size, "pre_epochs": 1, "pre_steps": 4, "ft_epochs": 1, "ft_steps": 4, "batch": 8}
    out = args.out.resolve()
    data = out / "data"
    t_start = time.perf_counter()
    if not (data / "ground_truth.json").is_file():
        write_batch(data, n=size["n"], kind="fish", shape=size["shape"], seed=0)
    vols = [str(data / f"vol_{i:03d}.npy") for i in range(size["n"])]
    labs = [str(data / f"vol_{i:03d}_labels.npy") for i in range(size["n"])]
    n_train = size["n"] - size["n_test"]
    # Every class must occur in the held-out volumes, or its IoU is undefined.
    test_lab = np.concatenate([np.load(p).ravel() for p in labs[n_train:]])
    train_lab = np.concatenate([np.load(p).ravel() for p in labs[:n_train]])
    voxels = {LABELS["fish"][c]: [int((train_lab == c).sum()), int((test_lab == c).sum())] for c in CLASSES}
    if any(min(v) == 0 for v in voxels.values()):
        raise SystemExit(f"a class is missing from the training or test volumes: {voxels}")
    print(f"class voxels (train, test): {voxels}", flush=True)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"pretrain": [], "finetune": []}
    done_pre = {(r["method"], r["seed"]) for r in results["pretrain"]}
    done_ft = {(r["method"], r["seed"], r["fraction"]) for r in results["finetune"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    for seed in range(args.seeds):
        for m in METHODS:
            if (m, seed) in done_pre:
                continue
            r = _run_child(m, seed, vols, out / f"pre_{m}_{seed}", size, size["pre_epochs"], size["pre_steps"],
                           args.threads, env)
            results["pretrain"].append(r)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"pretrain {m} seed {seed}: {r['s_per_step']:.3f} s/step, {r['wall_s']:.0f} s, "
                  f"peak RSS +{r['peak_rss_delta_mib']:.0f} MiB, load {r['load_1min']}", flush=True)
        for m, _ in ROWS:
            for frac in (0.01, 1.0):
                if (m, seed, frac) in done_ft:
                    continue
                cfg = SegConfig(classes=CLASSES, encoder=None if m == "none" else str(out / f"pre_{m}_{seed}"),
                                fraction=frac, input_size=size["input_size"], batch_size=size["ft_batch"],
                                epochs=size["ft_epochs"], steps_per_epoch=size["ft_steps"], seed=seed,
                                devices=size["devices"], precision=size["precision"])
                load0 = os.getloadavg()[0]
                met = finetune(vols[:n_train], labs[:n_train], out / f"ft_{m}_{seed}_{frac}", cfg,
                               test_volumes=vols[n_train:], test_labels=labs[n_train:], label_names=LABELS["fish"],
                               overwrite=True)
                r = {"method": m, "seed": seed, "fraction": frac, **met, "load_1min": [load0, os.getloadavg()[0]]}
                results["finetune"].append(r)
                results_path.write_text(json.dumps(results, indent=1))
                print(f"finetune {m} seed {seed} {frac:.0%}: {met['iou']} ({met['n_train_slices']} slices, "
                      f"{met['seconds']:.0f} s)", flush=True)
    if len(results.get("memory", [])) < len(METHODS):
        results["memory"] = []
        for m in METHODS:  # isolated short runs: the peak memory of each method at the same batch size
            r = _run_child(m, 0, vols, out / f"mem_{m}", size, 1, 10, args.threads, env)
            results["memory"].append(r)
            print(f"memory {m}: peak RSS +{r['peak_rss_delta_mib']:.0f} MiB", flush=True)
    # Accumulated over invocations: a resumed run adds its own time.
    results["total_s"] = results.get("total_s", 0.0) + time.perf_counter() - t_start
    total = results["total_s"]
    results_path.write_text(json.dumps(results, indent=1))

    seeds = range(args.seeds)
    ft = [r for r in results["finetune"] if r["seed"] in seeds]
    pre = [r for r in results["pretrain"] if r["seed"] in seeds]
    names = [LABELS["fish"][c] for c in CLASSES]
    lines = [f"| encoder init | {names[0]} IoU 1% | {names[0]} IoU 100% | mean IoU ({', '.join(names)}) 1% | "
             "mean IoU 100% | pre-training s/step | peak RSS delta (MiB) | load (1 min) during pre-training |",
             "|---|---|---|---|---|---|---|---|"]
    for m, label in ROWS:
        cells = []
        for key in (names[0], "mean"):
            for frac in (0.01, 1.0):
                rs = [r for r in ft if r["method"] == m and r["fraction"] == frac]
                cells.append(_fmt([r["iou"][key] if key != "mean" else r["mean_iou"] for r in rs]))
        cells = [cells[0], cells[1], cells[2], cells[3]]
        ps = [r for r in pre if r["method"] == m]
        ms = [r for r in results["memory"] if r["method"] == m]
        if ps:
            sps = f"{np.mean([r['s_per_step'] for r in ps]):.3f}"
            mem = (f"{ms[0]['cuda_peak_mib']:.0f} (GPU)" if "cuda_peak_mib" in ms[0]
                   else f"{ms[0]['peak_rss_delta_mib']:.0f}")
            load = f"{np.mean([np.mean(r['load_1min']) for r in ps]):.2f}"
        else:
            sps = mem = load = "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sps} | {mem} | {load} |")
    n_slices = {frac: sorted({r["n_train_slices"] for r in ft if r["fraction"] == frac}) for frac in (0.01, 1.0)}
    class_desc = ", ".join(f"{LABELS['fish'][c]} ({c})" for c in CLASSES)
    body = "\n".join([
        f"{size['n']} synthetic fish volumes {tuple(size['shape'])} (`write_batch(kind='fish', seed=0)`); "
        f"pre-training on all {size['n']} (unlabelled; 20% held out for the pretext validation loss), "
        f"fine-tuning on volumes 0-{n_train - 1}, IoU on volumes {n_train}-{size['n'] - 1} (held out, pooled voxels, "
        f"working-copy grid). Classes: {class_desc}; voxels (train, "
        f"test): {voxels}.",
        f"Pre-training: ResNet-18, input {size['input_size']}, batch {size['batch']} slices (SimCLR and MoCo v3: "
        f"two views each), {size['pre_epochs']} x {size['pre_steps']} steps, AdamW 1e-3 cosine, {size['devices']}, "
        f"{size['precision']}, {args.threads} torch thread(s) per process. Fine-tuning: DeepLabV3+, batch {size['ft_batch']}, "
        f"{size['ft_epochs']} x {size['ft_steps']} steps whatever the fraction; labelled slices used: "
        f"1%: {n_slices[0.01]}, 100%: {n_slices[1.0]}.",
        f"Mean ± sample std over seeds {list(seeds)} (each seed: its own pre-training and fine-tuning). "
        f"s/step: median interval between training-step starts (data included), mean over seeds. Peak RSS "
        f"delta: VmHWM of a separate 10-step pre-training process minus its RSS before training. "
        f"Load: 1-minute load average at the start and end of each pre-training, averaged (the CPU was shared). "
        f"Total wall time {total / 60:.1f} min.",
        "",
        *lines,
    ])
    print(body)
    if not args.no_write:
        update_section("Pre-training for segmentation" + (" (large)" if args.large else ""), body)


if __name__ == "__main__":
    main()
