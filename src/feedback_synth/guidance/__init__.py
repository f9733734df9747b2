"""The method's feedback: the criteria C(f(x)) and the guided step that ascends them (docs/method.md)."""
