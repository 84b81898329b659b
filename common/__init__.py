"""fedlinear's Flower-free core: data, model, config, storage and the least-squares reference."""
