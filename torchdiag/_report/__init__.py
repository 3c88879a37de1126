"""The report as data (``report``), its text rendering (``render``) and the tag schema of its scalars (``tags``)."""
