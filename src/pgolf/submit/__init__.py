"""pgolf.submit stage."""
