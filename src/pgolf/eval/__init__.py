"""pgolf.eval stage: non-overlapping, sliding-window and score-first TTT evaluation, the causal n-gram tilt,
the run-directory eval plan (`evaluate_run`) and the legality checks (SPEC §5)."""
