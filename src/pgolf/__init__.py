"""pgolf: parameter golf as a tested pipeline (data -> model -> optim -> train -> quant -> eval -> submit)."""

__version__ = "0.1.0"
