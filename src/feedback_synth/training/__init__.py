"""The timm classifier: the model and its preprocessing contract, the losses, training, evaluation."""
