"""pgolf.eval stage."""
