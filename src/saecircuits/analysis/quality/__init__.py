"""Quality: can a run's numbers support a conclusion (the model performs the behaviour, the SAE reconstructs, the checks and their thresholds)."""
