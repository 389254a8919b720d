"""pgolf.data stage."""
