"""Bottom floor of the package: helpers with no knowledge of models (dependency versions, ...)."""
