"""Configuration: the typed schema every YAML group is checked against (`schema`, with the
trainer registry), the one conversion from Hydra's config to it (`load`), and where the
project's files live (`paths`)."""
