"""What a resumable checkpoint costs inside the training clock (train.checkpoint_seconds, docs/reliability.md).

For each preset's model: the Trainer's checkpoint() (state_dict of weights, optimizers after one step,
EMA, loader and RNG states; torch.save; fsync; rename) timed best-of-3 into a temp folder, the file's size,
and the share of a 600 s budget that checkpoints every 60 s would take. Single process; on N ranks only
rank 0 writes, the others wait at the next step's all-reduce.

  python benchmarks/checkpoint_cost.py [--presets cpu-golf pr1394 pr1541] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def measure(preset_name: str, folder: Path) -> tuple[int, int, float]:
    """(parameters, checkpoint bytes, best seconds of 3 writes) for the preset's model."""
    import numpy as np

    from pgolf.config import preset
    from pgolf.data.shards import shard_name, write_shard
    from pgolf.train.loop import Trainer

    cfg = preset(preset_name)
    data = folder / f"data_{preset_name}"
    data.mkdir(exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 4 * cfg.data.train_seq_len + 1)
    write_shard(data / shard_name("train", 0), tokens)
    cfg.data.dir, cfg.train.warmup_steps, cfg.train.device = str(data), 0, "cpu"
    cfg.data.train_batch_tokens, cfg.data.grad_accum = cfg.data.train_seq_len, 1
    run = folder / f"run_{preset_name}"
    run.mkdir()
    trainer = Trainer(cfg, run)
    trainer.step(trainer.stepper.run(trainer.batches()), 0.0)  # optimizer state exists after a step
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.checkpoint()
        times.append(time.perf_counter() - t0)
    trainer.close()
    params = sum(p.numel() for p in trainer.raw.parameters())
    return params, (run / "checkpoint.pt").stat().st_size, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-golf", "pr1394", "pr1541"])
    ap.add_argument("--dir", default=None, help="folder for the temp files (default: the system temp dir)")
    args = ap.parse_args()
    print(f"{'preset':10s} {'params':>12s} {'checkpoint MB':>14s} {'seconds':>8s} {'% of 600 s at 60 s':>19s}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.presets:
            params, size, seconds = measure(name, Path(tmp))
            share = 100 * 10 * seconds / 600  # ten checkpoints in a 600 s run
            print(f"{name:10s} {params:12,d} {size / 1e6:14.1f} {seconds:8.3f} {share:18.2f}%")


if __name__ == "__main__":
    main()
