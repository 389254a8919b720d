"""pgolf.model stage."""
