"""Runtime of mixture-of-experts serving: the expert-load recorder, applying an expert
placement to a model's sparse layers, and the step-boundary rebalance."""
