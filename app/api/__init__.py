"""HTTP routes, request and response models, error mapping."""
