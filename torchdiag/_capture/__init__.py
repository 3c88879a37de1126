"""The hooks: the process-wide module hooks and their registry, eager and compiled capture into the step buffer."""
