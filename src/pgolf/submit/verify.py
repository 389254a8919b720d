"""What `pgolf bundle` checks before it publishes a run: every part is this run's, and the artifact it ships
is the one quant.json describes and loads into the config's model."""

from __future__ import annotations

from pathlib import Path

from pgolf import rundir
from pgolf.config import load_run_config


def verify_run_for_bundle(run_dir: str | Path) -> None:
    """Refuse (ValueError naming the file) stale or mismatched parts, an over-cap or missing artifact, one
    whose byte count differs from quant.json's, or one that does not load into config.toml's model."""
    from pgolf.quant.pipeline import load_artifact_model

    run_dir = Path(run_dir)
    rundir.check_fresh(run_dir, ("train", "quant", "eval"), same_config=True)  # bundle rewrites summary.json
    quant = rundir.read_json(run_dir, rundir.QUANT_JSON)
    artifact = rundir.path(run_dir, rundir.ARTIFACT)
    if not quant.get("fits") or not artifact.is_file():
        raise rundir.StaleRunError(
            f"{rundir.path(run_dir, rundir.QUANT_JSON)}: no artifact within the cap to ship ({artifact} missing)"
        )
    size = artifact.stat().st_size
    if size != quant.get("artifact_bytes"):
        raise rundir.StaleRunError(
            f"{artifact}: {size:,} bytes, but quant.json records {quant.get('artifact_bytes')!r}"
        )
    load_artifact_model(artifact, load_run_config(run_dir))
