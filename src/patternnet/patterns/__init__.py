"""Learning signal estimators: statistics → estimators → patterns (method.md §2)."""
