"""Pure diagnosis: numbers + config -> findings (per-layer rules, drift, the run's verdict, instability rules)."""
