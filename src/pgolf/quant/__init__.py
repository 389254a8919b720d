"""pgolf.quant stage."""
