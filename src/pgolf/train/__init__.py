"""pgolf.train stage."""
