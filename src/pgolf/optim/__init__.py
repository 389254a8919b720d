"""pgolf.optim stage."""
