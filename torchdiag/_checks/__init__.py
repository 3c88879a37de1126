"""``check()``, ``fix_init`` and ``apply_suggestions``: one recorded pass of a model, and fixes applied in place."""
