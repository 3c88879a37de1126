"""The recorder: the step state machine of a watch, and each recorded step assembled into ``StepStats``."""
