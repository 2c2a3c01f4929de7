"""The example schema, readers for user files, validation with a quarantine, built-in corpora."""
