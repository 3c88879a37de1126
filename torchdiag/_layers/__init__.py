"""Static facts about modules: which are watched and the role each plays (taxonomy), fans and init gains."""
